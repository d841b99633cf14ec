"""The lean front door for the completion routes: HTTP/1.1 on httptools, no framework.

Nearly every request a daemon serves is a chat or text completion, and aiohttp's server side
costs about 0.1 ms per request, as much as the relay itself. A connection whose first
request is `POST` to a completion route over HTTP/1.1 is served here (`listener.py` decides
from the request line); every other connection goes to aiohttp from its first byte.

Should a connection served here later send anything else (`GET /v1/models`, HTTP/1.0, a
compressed body), that request and the rest of the connection are handed to aiohttp:
requests already read are re-framed whole, later ones are passed on as they arrive (head,
then body pieces). An upgrade offer (`Upgrade: h2c`) is declined: the request is served as
plain HTTP/1.1, as if the offer were not there.

Requests on one connection are answered in order (pipelining works; at most
`MAX_PIPELINED` wait, then reading pauses). Limits match the aiohttp side: bodies over
`max_body_bytes` get 413, a body that stops arriving 408 after `body_timeout`, an over-long
head 414/431, and a kept-alive connection is closed after `idle_timeout` without a new
request head; each refusal ends the connection. A client that goes away, or closes its
sending side, cancels its request, which frees its engine slot (as aiohttp does).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import cast

import httptools

from .api import (
    KINDS,
    Completions,
    api_key_ok,
    bearer,
    body_timeout_message,
    serve_completion,
    too_large_message,
)
from .http1 import MAX_HEAD, MAX_LINE, SSE_HEAD, ParsedRequest, answer_head
from .reply import answer_error

logger = logging.getLogger(__name__)

MAX_PIPELINED = 8
# A head still incomplete after this many bytes read is refused: httptools keeps a header
# it has not finished in memory, and calls back only once it is complete.
MAX_PARTIAL_HEAD = 1 << 20
# After a refusal, what the client still sends is read and dropped this long before the
# connection closes: closing with unread input would reset it, and the client could lose
# the refusal itself.
LINGER_S = 2.0


class FastConnection(asyncio.Protocol):
    """One client connection that began with a completion request."""

    def __init__(self, ctx: Completions, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.ctx = ctx
        self.fallback = fallback
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: ParsedRequest | None = None  # being parsed
        self.queue: deque[ParsedRequest] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.delegate: asyncio.Protocol | None = None  # aiohttp, once handed over
        self.upgrade: ParsedRequest | None = None  # an upgrade offer the parser stopped at
        self.ignoring = False  # refused: the rest of the input is dropped
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_timer_held = False  # stopped while reading is paused (not the client's fault)
        self.idle_timer: asyncio.TimerHandle | None = None
        self.partial_head = 0  # bytes read while the current head is incomplete
        self.forwarded = 0  # pieces passed to aiohttp after the handover

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.ignoring or self.closed:
            return
        fresh = self.delegate is not None and self.req is None  # no request half-read
        forwarded = self.forwarded
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._decline_upgrade(data[upgrade.args[0]:] if upgrade.args else b"")
            return
        except httptools.HttpParserError as exc:
            if self.delegate is not None:
                # aiohttp answers 400 after its earlier answers, then closes: give it these
                # bytes if none of them reached it yet, else a line it refuses the same way.
                self.ignoring = True
                self._forward(data if fresh and self.forwarded == forwarded
                              else b"\x00 malformed request\r\n\r\n")
                return
            self._refuse(400, f"malformed HTTP request: {exc}", "invalid_request")
            return
        if self.req is not None and not self.req.method:
            self.partial_head += len(data)
            if self.partial_head > MAX_PARTIAL_HEAD:
                self._head_refused(431, f"the request head is larger than {MAX_HEAD} bytes")

    def eof_received(self) -> bool | None:
        if self.delegate is not None:
            return self.delegate.eof_received()
        return None  # close: like aiohttp, a client that stops sending is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timers()
        if self.worker is not None:
            self.worker.cancel()  # the relay closes its engine connection: the slot frees
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(ConnectionResetError("the client went away"))
            self.drained.exception()  # retrieved here when nobody awaits it
        if self.delegate is not None:
            self.delegate.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.pause_writing()
        self.writing_paused = True

    def resume_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.resume_writing()
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # ---- httptools callbacks ---------------------------------------------------------
    # After a refusal the parser may still call back for the rest of the bytes it was fed:
    # those callbacks find no request (`self.req` is None) and do nothing.

    def on_message_begin(self) -> None:
        if not self.ignoring:
            self.req = ParsedRequest()

    def on_url(self, url: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.url += url
        req.head_size += len(url)
        if len(req.url) > MAX_LINE:
            self._head_refused(414, f"the request target is longer than {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.req is not None and (problem := self.req.add_header(name, value)):
            self._head_refused(431, problem)

    def on_headers_complete(self) -> None:
        req = self.req
        if req is None or self.transport is None:
            return
        self._stop_idle_timer()
        self.partial_head = 0
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = bool(parser.should_upgrade())
        if req.upgrade:  # the parser stops after this head: _decline_upgrade goes on
            self.upgrade, self.req = req, None
            if req.method == b"CONNECT":
                self._refuse(405, "CONNECT is not served here", "method_not_allowed")
            return
        req.chunked = b"chunked" in req.wanted.get(b"transfer-encoding", b"").lower()
        if self.delegate is not None:
            self._forward(req.head(framing=True) + b"\r\n")
            return
        encoding = req.wanted.get(b"content-encoding", b"identity").strip().lower()
        if req.method == b"POST" and req.version == "1.1" and encoding == b"identity":
            req.kind = KINDS.get(req.url.split(b"?", 1)[0].decode("latin-1"))
        limit = self.ctx.server.max_body_bytes
        length = req.wanted.get(b"content-length")
        if length is not None and int(length) > limit:
            self._refuse(413, too_large_message(limit), "request_too_large")
            return
        idle = self.worker is None and not self.queue
        if req.kind is None and idle:
            self._hand_over()  # this request and the rest go to aiohttp as they come
            return
        if idle and req.wanted.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._start_body_timer()

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None:
            return
        if self.delegate is not None:
            self._forward(b"%x\r\n%s\r\n" % (len(body), body) if req.chunked else body)
            return
        req.size += len(body)
        limit = self.ctx.server.max_body_bytes
        if req.size > limit:
            self._refuse(413, too_large_message(limit), "request_too_large")
            return
        req.body.append(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        self._stop_body_timer()
        if req is None or self.ignoring:
            return
        if self.delegate is not None:
            if req.chunked:
                self._forward(b"0\r\n\r\n")
            return
        self.queue.append(req)
        if len(self.queue) >= MAX_PIPELINED:
            self._pause_reading()
        self._kick()

    # ---- serving ---------------------------------------------------------------------

    def _kick(self) -> None:
        self._stop_idle_timer()
        if self.worker is None and not self.closed:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self.queue and not self.closed:
                req = self.queue.popleft()
                if req.kind is None and req.refusal is None:
                    self.queue.appendleft(req)
                    self._hand_over()
                    return
                if not await self._serve(req):
                    if req.refusal is not None:
                        self._linger()
                    else:
                        self._close()
                    return
                if self.reading_paused and len(self.queue) < MAX_PIPELINED // 2:
                    self._resume_reading()
            self._start_idle_timer()
        finally:
            self.worker = None

    async def _serve(self, req: ParsedRequest) -> bool:
        """Answer one request; False when the connection must close after it."""
        reply = FastReply(self, req.keep_alive)
        if req.refusal is not None:
            status, message, code = req.refusal
            await answer_error(reply, status, message, code=code)
            return False
        assert req.kind is not None
        try:
            if not api_key_ok(self.ctx.server, bearer(req.header(b"authorization"),
                                                      req.header(b"x-api-key"))):
                await answer_error(reply, 401, "invalid or missing API key",
                                   code="invalid_api_key")
            else:
                await serve_completion(self.ctx, req.kind, b"".join(req.body),
                                       req.header(b"x-priority"), reply)
        except ConnectionError:
            return False
        except Exception:
            logger.exception("error serving %s", req.url.decode("latin-1"))
            if not reply.started:  # a stream under way cannot turn into an error answer
                await answer_error(reply, 500, "internal error in the supervisor")
            return False
        return req.keep_alive

    def _hand_over(self) -> None:
        """aiohttp serves the queued requests, the one being read, and the rest."""
        assert self.transport is not None
        self._stop_idle_timer()
        self._stop_body_timer()
        inner = self.fallback()
        self.delegate = inner
        inner.connection_made(self.transport)
        pending = list(self.queue)
        self.queue.clear()
        refused = next((i for i, r in enumerate(pending) if r.refusal is not None), None)
        if refused is not None:
            # A refusal ends the input; aiohttp cannot send it after its own answers, so the
            # last request before it asks aiohttp to close the connection instead.
            pending = pending[:refused]
        for i, queued in enumerate(pending):
            last = refused is not None and i == len(pending) - 1
            self._forward(queued.reframed(close=last))
        current = self.req
        if current is not None and current.method and refused is None:  # body coming
            self._forward(current.head(framing=True) + b"\r\n")
            for piece in current.body:
                self._forward(b"%x\r\n%s\r\n" % (len(piece), piece) if current.chunked
                              else piece)
        if self.reading_paused and not self.ignoring:
            self._resume_reading()

    def _decline_upgrade(self, rest: bytes) -> None:
        """The parser stopped after an upgrade offer's head: parse that head again without
        the offer, then its body and what follows, as plain HTTP/1.1."""
        req, self.upgrade = self.upgrade, None
        if req is None or self.ignoring:
            return
        self.parser = httptools.HttpRequestParser(self)
        self.data_received(req.head(framing=True, drop=(b"upgrade",)) + b"\r\n" + rest)

    def _forward(self, data: bytes) -> None:
        assert self.delegate is not None
        self.forwarded += 1
        self.delegate.data_received(data)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.writing_paused and not self.closed:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained
        if self.closed:
            raise ConnectionResetError("the client went away")

    # ---- limits ----------------------------------------------------------------------

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` after what is already queued, then close; read nothing more."""
        self._stop_body_timer()
        self.ignoring = True
        self.req = None
        self._pause_reading()
        if self.delegate is not None:
            self._close()  # aiohttp may be mid-answer: nothing can be added
            return
        self.queue.append(ParsedRequest.refused(status, message, code))
        self._kick()

    def _head_refused(self, status: int, message: str) -> None:
        self._refuse(status, message, "request_header_too_large" if status == 431
                     else "request_uri_too_long")

    def _start_body_timer(self) -> None:
        if self.reading_paused:
            self.body_timer_held = True
            return
        self.body_timer = asyncio.get_running_loop().call_later(
            self.ctx.server.body_timeout, self._body_timed_out)

    def _stop_body_timer(self) -> None:
        self.body_timer_held = False
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _body_timed_out(self) -> None:
        self.body_timer = None
        limit = self.ctx.server.body_timeout
        logger.info("closed a connection whose request body did not arrive within %gs", limit)
        self._refuse(408, body_timeout_message(limit), "request_timeout")

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
            if self.body_timer is not None:  # the body waits on us, not on the client
                self._stop_body_timer()
                self.body_timer_held = True

    def _resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
            if self.body_timer_held:
                self.body_timer_held = False
                self._start_body_timer()

    def _start_idle_timer(self) -> None:
        """Between requests: bound the wait for the next complete head."""
        if self.closed or self.ignoring or self.delegate is not None:
            return
        if self.req is not None and self.req.method:
            return  # a head is in and its body is coming: the body timer runs
        self.idle_timer = asyncio.get_running_loop().call_later(
            self.ctx.server.idle_timeout, self._idle_expired)

    def _stop_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if self.req is None:
            self._close()  # idle between requests: close quietly, as aiohttp does
        else:
            self._refuse(408, f"no complete request head within "
                              f"{self.ctx.server.idle_timeout:g}s", "request_timeout")

    def _cancel_timers(self) -> None:
        self._stop_body_timer()
        self._stop_idle_timer()

    def _linger(self) -> None:
        """Stop writing, drop what still arrives for LINGER_S, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.ignoring = True
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self.reading_paused = False
        self.idle_timer = asyncio.get_running_loop().call_later(LINGER_S, self._close)

    def _close(self) -> None:
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class FastReply:
    """A `Reply` written straight to the connection's transport."""

    __slots__ = ("conn", "keep_alive", "started")

    def __init__(self, conn: FastConnection, keep_alive: bool) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.started = False

    async def answer(self, status: int, body: bytes, content_type: str = "application/json",
                     headers: Mapping[str, str] | None = None) -> None:
        extra = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nContent-Length: " \
            + str(len(body)).encode() + b"\r\n"
        if headers:
            extra += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self.started = True
        self.conn.write(answer_head(status, extra, self.keep_alive) + body)
        await self.conn.drain()

    async def start_stream(self) -> None:
        self.started = True
        self.conn.write(answer_head(200, SSE_HEAD + b"Transfer-Encoding: chunked\r\n",
                                    self.keep_alive))

    async def send(self, data: bytes) -> None:
        if data:
            self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.conn.drain()

    async def end(self) -> None:
        self.conn.write(b"0\r\n\r\n")
