"""A lean HTTP/1.1 client for the hot path: POST to a loopback engine, relay the answer.

aiohttp's client costs the daemon more CPU per request than the rest of a relay put
together (request objects, tracing hooks, a body-writer task, cookie and redirect logic
the engines never need). This one writes a request in one syscall on a keep-alive
connection and hands body bytes over as they arrive; httptools (llhttp, the parser
Node.js uses) does the parsing, chunked framing included. Reading pauses the socket
when the caller falls behind (a slow client), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # buffered body bytes that pause reading from the engine
LOW_WATER = 64 * 1024
KEEPALIVE_S = 3.0  # llama-server closes idle connections after 5 s
CONNECT_TIMEOUT_S = 10.0


class UpstreamError(Exception):
    """The connection to the engine failed or the engine sent something unparsable."""


class Disconnected(UpstreamError):
    """The engine closed the connection before the first byte of an answer.

    On a pooled connection this usually means the engine closed it while idle; nothing
    was generated, so the request may be sent again.
    """


class Response:
    """One answer from the engine: status and content type at once, then body bytes."""

    __slots__ = ("_conn", "content_type", "status")

    def __init__(self, status: int, content_type: str, conn: _Connection) -> None:
        self.status = status
        self.content_type = content_type
        self._conn = conn

    @property
    def complete(self) -> bool:
        """Whether the whole body has been read by the caller."""
        return self._conn.complete and not self._conn.chunks

    async def read_chunk(self, timeout: float | None) -> bytes:
        """Every body byte that has arrived, waiting up to `timeout` s for one; b"" at the end.

        TimeoutError after `timeout` seconds without a byte.
        """
        return await self._conn.read_chunk(timeout)

    async def read(self, timeout: float | None) -> bytes:
        """The rest of the body; `timeout` bounds the wait for each piece of it."""
        parts = []
        while data := await self._conn.read_chunk(timeout):
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the answer: keep the connection for the next request if it can be."""
        self._conn.finish()

    def close(self) -> None:
        """Drop the connection; an engine mid-answer sees the disconnect and frees its slot."""
        self._conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive socket to an engine and the parser of the answer under way."""

    def __init__(self, pool: Upstream, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head: asyncio.Future[int] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.closed = False
        self.error: Exception | None = None
        self.received = False
        self.framed = False  # Content-Length or chunked: the end is in the stream, not EOF
        self.keep_alive = False
        self.interim = False
        self.content_type = ""
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.parser is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"unparsable answer from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.complete:
            return
        if self.head is not None and self.head.done() and not self.framed:
            self._message_complete()  # an answer delimited by the end of the connection
            return
        if not self.received:
            self._fail(Disconnected("the engine closed the connection"))
        else:
            self._fail(UpstreamError("the engine closed the connection mid-answer"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-type":
            self.content_type = value.decode("latin-1").split(";", 1)[0].strip()
        elif lowered in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        assert self.parser is not None and self.head is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the answer follows
            self.interim = True
            self.content_type = ""
            self.framed = False
            return
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once complete
        if not self.head.done():
            self.head.set_result(status)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self._message_complete()

    # the request side

    def send(self, request: bytes) -> asyncio.Future[int]:
        """Write one request; the future resolves to the status once the headers are in."""
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        self.chunks.clear()
        self.buffered = 0
        self.complete = self.received = self.framed = self.keep_alive = self.interim = False
        self.content_type = ""
        self.error = None
        self.transport.write(request)
        return self.head

    async def read_chunk(self, timeout: float | None) -> bytes:
        if not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            timer = None if timeout is None else self.loop.call_later(
                timeout, _expire, self.waiter)
            try:
                await self.waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
            if not self.chunks:
                if self.error is not None:
                    raise self.error
                return b""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """Back to the pool when the answer was read to its end and keep-alive holds."""
        keep = (self.complete and self.keep_alive and not self.chunks and not self.closed
                and self.error is None)
        self.parser = None
        if keep:
            self.idle_since = time.monotonic()
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.parser = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    # internals

    def _message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: a request that already gave up is not told
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Upstream:
    """Keep-alive connections to every engine, opened on demand and never limited in number."""

    def __init__(self, keepalive: float = KEEPALIVE_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}

    async def post(self, url: str, body: bytes, content_type: bytes = b"application/json",
                   timeout: float | None = None) -> Response:
        """POST `body` to `url` and wait up to `timeout` s for the answer's status line.

        Raises Disconnected when the engine closed the connection before answering,
        UpstreamError when the connection failed otherwise, TimeoutError on silence.
        """
        key, request_line = self._target(url)
        head = (request_line + b"Content-Type: " + content_type
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        conn = self._take(key)
        if conn is None:
            conn = await self._connect(key)
        self._busy.add(conn)
        future = conn.send(head + body)
        try:
            if timeout is None:
                status = await future
            else:
                async with asyncio.timeout(timeout):
                    status = await future
        except BaseException:
            conn.close()
            raise
        return Response(status, conn.content_type, conn)

    def put(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        for conn in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            conn.close()
        self._idle.clear()
        self._busy.clear()

    def _target(self, url: str) -> tuple[tuple[str, int], bytes]:
        known = self._targets.get(url)
        if known is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"cannot POST to {url!r}: only http:// engines")
            try:
                port = parts.port or 80
            except ValueError as exc:
                raise UpstreamError(f"cannot POST to {url!r}: {exc}") from None
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            line = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
            known = self._targets[url] = ((parts.hostname, port), line)
        return known

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        """The most recently used idle connection still inside the keep-alive window."""
        idle = self._idle.get(key)
        if not idle:
            return None
        cutoff = time.monotonic() - self.keepalive
        found = None
        while idle and found is None:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= cutoff:
                found = conn
            else:
                conn.close()
        # The rest went idle earlier; close those past the window now.
        for stale in [c for c in idle if c.idle_since < cutoff]:
            stale.close()
        return found

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise UpstreamError(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        return conn
