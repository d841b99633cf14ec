"""The lean front door for the completion routes: HTTP/1.1 on httptools, no framework.

Nearly every request a daemon serves is a chat or text completion, and aiohttp's server side
costs about 0.1 ms per request, as much as the relay itself. A connection whose first
request is `POST` to a completion route over HTTP/1.1 is served here (`listener.py` decides
from the request line); every other connection goes to aiohttp from its first byte. Should a
connection served here later send anything else (`GET /v1/models`, HTTP/1.0, ...), that
request and everything after it are handed to aiohttp, re-framed from what the parser saw.

Requests on one connection are answered in order (pipelining works; at most
`MAX_PIPELINED` wait, then reading pauses). Limits match the aiohttp side: bodies over
`max_body_bytes` get 413, a body that stops arriving 408 after `body_timeout`, a kept-alive
connection is closed after `idle_timeout` without a new request head; each of these closes
the connection. A client that goes away cancels its request, which frees its engine slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from .api import (
    KINDS,
    Completions,
    api_key_ok,
    bearer,
    body_timeout_message,
    serve_completion,
)
from .openai_compat import dumps, error_body
from .reply import SSE_HEADERS

logger = logging.getLogger(__name__)

MAX_PIPELINED = 8
# A request head still incomplete after this many bytes is refused (431). httptools keeps a
# header it has not finished in memory, with no bound of its own.
MAX_HEAD_BYTES = 1 << 20
# After a refusal, what the client still sends is read and dropped this long before the
# connection closes: closing with unread input would reset it, and the client could lose
# the refusal itself.
LINGER_S = 2.0
# Header names the completion routes read (lower case, as compared).
_WANTED = frozenset((b"authorization", b"x-api-key", b"x-priority", b"content-length",
                     b"expect"))
# Not carried over when a request is re-framed for aiohttp: the body is sent whole.
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_SSE_HEAD = "".join(f"{k}: {v}\r\n" for k, v in SSE_HEADERS.items()).encode()
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def is_fast(request_line: bytes) -> bool:
    """Whether a connection that opens with this request line is served here."""
    parts = request_line.rstrip(b"\r").split(b" ")
    return (len(parts) == 3 and parts[0] == b"POST" and parts[2] == b"HTTP/1.1"
            and parts[1].split(b"?", 1)[0].decode("latin-1") in KINDS)


class _Date:
    """The `Date` header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.value


class _Request:
    """One request as the parser saw it."""

    __slots__ = ("body", "headers", "keep_alive", "kind", "method", "refusal", "size", "url",
                 "version", "wanted")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.wanted: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.kind: str | None = None  # None: not a completion route, aiohttp serves it
        self.refusal: tuple[int, str, str] | None = None

    def header(self, name: bytes) -> str | None:
        value = self.wanted.get(name)
        return None if value is None else value.decode("latin-1")

    def reframed(self) -> bytes:
        """The request as bytes aiohttp can parse: the body whole, with its length."""
        body = b"".join(self.body)
        lines = [self.method + b" " + self.url + b" HTTP/" + self.version.encode()]
        lines += [name + b": " + value for name, value in self.headers
                  if name.lower() not in _FRAMING]
        if body or self.method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _refusal(status: int, message: str, code: str) -> _Request:
    req = _Request()
    req.refusal = (status, message, code)
    req.keep_alive = False
    return req


class FastConnection(asyncio.Protocol):
    """One client connection that began with a completion request."""

    def __init__(self, ctx: Completions, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.ctx = ctx
        self.fallback = fallback
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: _Request | None = None  # being parsed
        self.queue: deque[_Request] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.delegate: asyncio.Protocol | None = None  # aiohttp, once handed over
        self.ignoring = False  # refused: the rest of the input is not read
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.close_when_done = False  # the client half-closed: answer, then close
        self.head_bytes = 0  # read while the current request head is incomplete

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.ignoring or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served here", "invalid_request")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}", "invalid_request")
            return
        if self.req is not None and not self.req.method:  # still in a head
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes",
                             "request_header_too_large")

    def eof_received(self) -> bool | None:
        if self.delegate is not None:
            return self.delegate.eof_received()
        if self.worker is not None or self.queue:
            self.close_when_done = True
            return True  # half-closed: answer what was asked, then close
        return None

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
            self.req = _Request()

    def on_url(self, url: bytes) -> None:
        if self.req is not None:
            self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.headers.append((name, value))
        lower = name.lower()
        if lower in _WANTED:
            req.wanted[lower] = value

    def on_headers_complete(self) -> None:
        req = self.req
        if req is None or self.transport is None:
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.head_bytes = 0
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        if req.method == b"POST" and req.version == "1.1":
            req.kind = KINDS.get(req.url.split(b"?", 1)[0].decode("latin-1"))
        length = req.wanted.get(b"content-length")
        limit = self.ctx.server.max_body_bytes
        if length is not None and int(length) > limit:
            self._refuse(413, _too_large(limit), "request_too_large")
            return
        if (req.kind is not None and self.delegate is None and self.worker is None
                and not self.queue
                and req.wanted.get(b"expect", b"").lower() == b"100-continue"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body_timer = asyncio.get_running_loop().call_later(
            self.ctx.server.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.size += len(body)
        limit = self.ctx.server.max_body_bytes
        if req.size > limit:
            self._refuse(413, _too_large(limit), "request_too_large")
            return
        req.body.append(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if req is None or self.ignoring:
            return
        if self.delegate is not None:
            self.delegate.data_received(req.reframed())
            return
        self.queue.append(req)
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._kick()

    # ---- serving ---------------------------------------------------------------------

    def _kick(self) -> None:
        if self.worker is None and not self.closed:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self.queue and not self.closed:
                req = self.queue.popleft()
                if req.kind is None and req.refusal is None:
                    self._hand_over(req)
                    return
                if not await self._serve(req):
                    if req.refusal is not None:
                        self._linger()
                    else:
                        self._close()
                    return
                if self.reading_paused and len(self.queue) < MAX_PIPELINED // 2:
                    assert self.transport is not None
                    self.reading_paused = False
                    self.transport.resume_reading()
            if self.close_when_done:
                self._close()
            elif not self.closed and not self.ignoring:
                self.idle_timer = asyncio.get_running_loop().call_later(
                    self.ctx.server.idle_timeout, self._idle_expired)
        finally:
            self.worker = None

    async def _serve(self, req: _Request) -> bool:
        """Answer one request; False when the connection must close after it."""
        reply = FastReply(self, req.keep_alive)
        if req.refusal is not None:
            status, message, code = req.refusal
            await reply.answer(status, dumps(error_body(status, message, code=code)))
            return False
        assert req.kind is not None
        try:
            if not api_key_ok(self.ctx.server, bearer(req.header(b"authorization"),
                                                      req.header(b"x-api-key"))):
                await reply.answer(401, dumps(error_body(
                    401, "invalid or missing API key", code="invalid_api_key")))
            else:
                await serve_completion(self.ctx, req.kind, b"".join(req.body),
                                       req.header(b"x-priority"), reply)
        except ConnectionError:
            return False
        except Exception:
            logger.exception("error serving %s", req.url.decode("latin-1"))
            if not reply.started:  # a stream under way cannot turn into an error answer
                await reply.answer(500, dumps(error_body(500, "internal error in the supervisor")))
            return False
        return req.keep_alive

    def _hand_over(self, first: _Request) -> None:
        """aiohttp serves this request and the rest of the connection."""
        assert self.transport is not None
        inner = self.fallback()
        self.delegate = inner
        inner.connection_made(self.transport)
        pending = [first, *self.queue]
        self.queue.clear()
        for req in pending:
            if req.refusal is None:  # a refused request stops the input: it is not served
                inner.data_received(req.reframed())
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

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
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        self.ignoring = True
        self.req = None
        if self.transport is not None:
            self.transport.pause_reading()
        if self.delegate is not None:
            self._close()  # aiohttp may be mid-answer: nothing can be added
            return
        self.queue.append(_refusal(status, message, code))
        self._kick()

    def _body_timed_out(self) -> None:
        self.body_timer = None
        limit = self.ctx.server.body_timeout
        logger.info("closed a connection whose request body did not arrive within %gs", limit)
        self._refuse(408, body_timeout_message(limit), "request_timeout")

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if self.req is None:
            self._close()  # idle between requests: close quietly, as aiohttp does
        else:
            self._refuse(408, f"no complete request head within "
                              f"{self.ctx.server.idle_timeout:g}s", "request_timeout")

    def _cancel_timers(self) -> None:
        for timer in (self.body_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        self.body_timer = self.idle_timer = None

    def _linger(self) -> None:
        """Stop writing, drop what still arrives for LINGER_S, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.ignoring = True
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self.idle_timer = asyncio.get_running_loop().call_later(LINGER_S, self._close)

    def _close(self) -> None:
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _too_large(limit: int) -> str:
    return f"request body larger than server.max_body_bytes ({limit} bytes)"


class FastReply:
    """A `Reply` written straight to the connection's transport."""

    __slots__ = ("conn", "keep_alive", "started")

    def __init__(self, conn: FastConnection, keep_alive: bool) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.started = False

    def _head(self, status: int, extra: bytes) -> bytes:
        self.started = True
        closing = b"" if self.keep_alive else b"Connection: close\r\n"
        return (b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
                + _Date.header() + extra + closing + b"\r\n")

    async def answer(self, status: int, body: bytes, content_type: str = "application/json",
                     headers: Mapping[str, str] | None = None) -> None:
        extra = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nContent-Length: " \
            + str(len(body)).encode() + b"\r\n"
        if headers:
            extra += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self.conn.write(self._head(status, extra) + body)

    async def start_stream(self) -> None:
        self.conn.write(self._head(200, _SSE_HEAD + b"Transfer-Encoding: chunked\r\n"))

    async def send(self, data: bytes) -> None:
        if data:
            self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.conn.drain()

    async def end(self) -> None:
        self.conn.write(b"0\r\n\r\n")
