"""HTTP/1.1 pieces of the fast front door: which connections it takes, what it keeps of a
request, the limits on a request head, and the heads of its answers."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from .api import KINDS
from .reply import SSE_HEADERS

# aiohttp's limits, so both front doors refuse the same heads.
MAX_LINE = 8190        # the request target, and one header line
MAX_HEAD = 64 * 1024   # the whole head
# Header names the fast path reads (lower case).
WANTED = frozenset((b"authorization", b"x-api-key", b"x-priority", b"content-length",
                    b"expect", b"content-encoding", b"transfer-encoding"))
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
SSE_HEAD = "".join(f"{k}: {v}\r\n" for k, v in SSE_HEADERS.items()).encode()


def is_fast(request_line: bytes) -> bool:
    """Whether a connection that opens with this request line is served by the fast path."""
    parts = request_line.rstrip(b"\r").split(b" ")
    return (len(parts) == 3 and parts[0] == b"POST" and parts[2] == b"HTTP/1.1"
            and parts[1].split(b"?", 1)[0].decode("latin-1") in KINDS)


class ParsedRequest:
    """One request as the parser saw it."""

    __slots__ = ("body", "chunked", "head_size", "headers", "keep_alive", "kind", "method",
                 "refusal", "size", "upgrade", "url", "version", "wanted")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.wanted: dict[bytes, bytes] = {}
        self.head_size = 0
        self.body: list[bytes] = []
        self.size = 0
        self.method = b""  # set when the head is complete
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.upgrade = False
        self.kind: str | None = None  # a completion route the fast path serves; None: aiohttp
        self.refusal: tuple[int, str, str] | None = None

    @classmethod
    def refused(cls, status: int, message: str, code: str) -> ParsedRequest:
        """A stand-in for a request that is answered with an error and ends the connection."""
        req = cls()
        req.refusal = (status, message, code)
        req.keep_alive = False
        return req

    def header(self, name: bytes) -> str | None:
        value = self.wanted.get(name)
        return None if value is None else value.decode("latin-1")

    def add_header(self, name: bytes, value: bytes) -> str | None:
        """Keep one header; a problem with the head's size, or None."""
        self.headers.append((name, value))
        line = len(name) + len(value) + 4
        self.head_size += line
        if line > MAX_LINE:
            return f"a header line is longer than {MAX_LINE} bytes"
        if self.head_size > MAX_HEAD:
            return f"the request head is larger than {MAX_HEAD} bytes"
        lower = name.lower()
        if lower in WANTED:
            self.wanted[lower] = value
        return None

    def head(self, *, framing: bool, close: bool = False, drop: tuple[bytes, ...] = ()) -> bytes:
        """The request line and headers; `framing` keeps Content-Length/Transfer-Encoding,
        `drop` leaves out more (lower-case names)."""
        lines = [self.method + b" " + self.url + b" HTTP/" + self.version.encode()]
        for name, value in self.headers:
            lower = name.lower()
            if ((not framing and lower in _FRAMING) or (close and lower == b"connection")
                    or lower in drop):
                continue
            lines.append(name + b": " + value)
        if close:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n"

    def reframed(self, close: bool = False) -> bytes:
        """The whole request as aiohttp can parse it: the body whole, with its length."""
        body = b"".join(self.body)
        length = (b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                  if body or self.method in (b"POST", b"PUT", b"PATCH") else b"")
        return self.head(framing=False, close=close) + length + b"\r\n" + body


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


def answer_head(status: int, extra: bytes, keep_alive: bool) -> bytes:
    """An answer's status line and headers (`extra`: whole header lines)."""
    closing = b"" if keep_alive else b"Connection: close\r\n"
    return (b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
            + _Date.header() + extra + closing + b"\r\n")
