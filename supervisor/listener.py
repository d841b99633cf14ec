"""The TCP listener: a per-connection guard in front of two HTTP servers.

A connection that opens with a completion request (`POST /v1/chat/completions HTTP/1.1`
and the like) goes to the lean front door in `fastpath.py`; any other goes to aiohttp's
request handler. The choice is made on the first request line.

aiohttp bounds how long a kept-alive connection may sit between requests, but not how many
connections are open nor how long a new one may take to send its first request head: a few
thousand sockets that connect and trickle a header byte now and then would hold file
descriptors and memory indefinitely. The guard refuses connections past
`server.max_connections` with a 503 and closes a connection whose first request head is not
complete within `server.header_timeout` with a 408. Both answers are OpenAI-shaped JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from .http1 import is_fast
from .openai_compat import dumps, error_body

logger = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
# A first request line longer than this goes to aiohttp, which refuses it.
SNIFF_LIMIT = 8192
Factory = Callable[[], asyncio.Protocol]


def refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 answer that ends the connection."""
    body = dumps(error_body(status, message, code=code))
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Guarded(asyncio.Protocol):
    """One client connection: counts it, times its first request head, picks its server."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.inner: asyncio.Protocol | None = None  # chosen on the first request line
        self.sniffed = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.heading = True  # still waiting for the end of the first request head
        self.carry = b""  # the last bytes seen, in case HEAD_END spans two reads
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        listener = self.listener
        if listener.open >= listener.max_connections:
            listener.refused += 1
            self.heading = False
            self.transport.write(refusal(
                503, "Service Unavailable",
                f"too many open connections (server.max_connections is "
                f"{listener.max_connections})", "overloaded"))
            self.transport.close()
            return
        listener.open += 1
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(
            listener.header_timeout, self._head_timed_out)
        listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.heading:
            if not self.counted:
                return  # refused: nothing more is read
            seen = self.carry + data
            if HEAD_END in seen:
                self._head_done()
            else:
                self.carry = seen[-(len(HEAD_END) - 1):]
        inner = self.inner
        if inner is None:
            self.sniffed += data
            end = self.sniffed.find(b"\n")
            if end < 0 and len(self.sniffed) < SNIFF_LIMIT:
                return
            inner = self._choose(self.sniffed[:end] if end >= 0 else b"")
            data, self.sniffed = self.sniffed, b""
        inner.data_received(data)

    def _choose(self, request_line: bytes) -> asyncio.Protocol:
        fast = self.listener.fast
        inner = fast() if fast is not None and is_fast(request_line) else self.listener.factory()
        self.inner = inner
        assert self.transport is not None
        inner.connection_made(self.transport)
        return inner

    def eof_received(self) -> bool | None:
        if not self.counted or self.inner is None:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self.listener.connections.discard(self)
        if self.counted:
            self.counted = False
            self.listener.open -= 1
            if self.inner is not None:
                self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.counted and self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted and self.inner is not None:
            self.inner.resume_writing()

    def _head_done(self) -> None:
        self.heading = False
        self.carry = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_timed_out(self) -> None:
        self.timer = None
        if not self.heading or self.transport is None or self.transport.is_closing():
            return
        self.heading = False
        self.listener.timed_out += 1
        logger.info("closed a connection that sent no complete request head in %gs",
                    self.listener.header_timeout)
        self.transport.write(refusal(
            408, "Request Timeout",
            f"no complete request head within {self.listener.header_timeout:g}s",
            "request_timeout"))
        self.transport.close()


class Listener:
    """Accepts TCP connections for `factory` (aiohttp's `runner.server`), within limits.

    `fast`, when given, makes the protocol for connections that open with a completion
    request (see `fastpath.is_fast`).
    """

    def __init__(self, factory: Factory, *, max_connections: int, header_timeout: float,
                 fast: Factory | None = None) -> None:
        self.factory = factory
        self.fast = fast
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.connections: set[_Guarded] = set()
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._server: asyncio.Server | None = None

    def stats(self) -> dict[str, int]:
        """Open connections now, and those refused or timed out since the start."""
        return {"open": self.open, "refused": self.refused, "head_timeouts": self.timed_out}

    async def start(self, host: str, port: int, backlog: int) -> int:
        """Listen on host:port; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Guarded(self), host, port, backlog=backlog, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; open connections stay until `close_all`."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def close_all(self) -> None:
        """Close every connection still open (at shutdown, after the drain)."""
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
