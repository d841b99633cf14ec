"""How an answer reaches the client, whichever HTTP server took the request.

The relay (`proxy.py`) writes through a `Reply`: one whole answer, or a stream of chunks.
The completion routes are served either by the lean front door (`fastpath.py`) or by
aiohttp (every other route, the admin socket, and connections that began with one of
those); `AiohttpReply` is the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aiohttp import web

from .openai_compat import dumps, error_body

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class Reply(Protocol):
    """One request's answer: `answer` once, or `start_stream`, `send`..., `end`."""

    async def answer(self, status: int, body: bytes, content_type: str = "application/json",
                     headers: Mapping[str, str] | None = None) -> None:
        """The whole answer at once."""

    async def start_stream(self) -> None:
        """Begin a 200 `text/event-stream` answer whose length is not known."""

    async def send(self, data: bytes) -> None:
        """One piece of the stream; waits while the client is not reading.

        Raises ConnectionError once the client has gone.
        """

    async def end(self) -> None:
        """Finish the stream."""


async def answer_error(reply: Reply, status: int, message: str, *, code: str | None = None,
                       headers: Mapping[str, str] | None = None) -> None:
    """An OpenAI-shaped error answer."""
    await reply.answer(status, dumps(error_body(status, message, code=code)), headers=headers)


class AiohttpReply:
    """A `Reply` for an aiohttp request; the handler returns `response` when done."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def answer(self, status: int, body: bytes, content_type: str = "application/json",
                     headers: Mapping[str, str] | None = None) -> None:
        self.response = web.Response(body=body, status=status, content_type=content_type,
                                     headers=headers)

    async def start_stream(self) -> None:
        self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await self.response.prepare(self.request)

    async def send(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()
