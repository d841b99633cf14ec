"""The TCP listener: aiohttp's request handler behind a per-connection guard.

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

from .openai_compat import dumps, error_body

logger = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"


def refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 answer that ends the connection."""
    body = dumps(error_body(status, message, code=code))
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Guarded(asyncio.Protocol):
    """One client connection: counts it, times its first request head, then steps aside."""

    def __init__(self, listener: Listener, inner: asyncio.Protocol) -> None:
        self.listener = listener
        self.inner = inner
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
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.heading:
            if not self.counted:
                return  # refused: nothing more is read
            seen = self.carry + data
            if HEAD_END in seen:
                self._head_done()
            else:
                self.carry = seen[-(len(HEAD_END) - 1):]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self.counted:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self.counted:
            self.counted = False
            self.listener.open -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
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
    """Accepts TCP connections for `factory` (aiohttp's `runner.server`), within limits."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], *, max_connections: int,
                 header_timeout: float) -> None:
        self.factory = factory
        self.max_connections = max_connections
        self.header_timeout = header_timeout
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
            lambda: _Guarded(self, self.factory()), host, port, backlog=backlog,
            reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; open connections are left to aiohttp's shutdown."""
        if self._server is not None:
            self._server.close()
            self._server = None
