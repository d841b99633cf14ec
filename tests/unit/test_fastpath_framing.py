"""The fast front door's pure parts: which connections it takes, and how it re-frames a
request for aiohttp (the sockets themselves are tested in tests/integration/test_fastpath.py)."""

from __future__ import annotations

import httptools
import pytest

from supervisor.http1 import ParsedRequest, is_fast


@pytest.mark.parametrize("line", [
    b"POST /v1/chat/completions HTTP/1.1",
    b"POST /v1/chat/completions HTTP/1.1\r",
    b"POST /v1/completions HTTP/1.1",
    b"POST /v1/embeddings HTTP/1.1",
    b"POST /chat/completions HTTP/1.1",
    b"POST /v1/chat/completions?stream=1 HTTP/1.1",
])
def test_completion_posts_over_http11_take_the_fast_path(line: bytes) -> None:
    assert is_fast(line)


@pytest.mark.parametrize("line", [
    b"GET /v1/chat/completions HTTP/1.1",       # wrong method: aiohttp answers 405
    b"POST /v1/chat/completions HTTP/1.0",      # no chunked answers in HTTP/1.0
    b"POST /v1/models HTTP/1.1",
    b"POST /admin/reload HTTP/1.1",
    b"POST /v1/chat/completions/ HTTP/1.1",
    b"POST http://host/v1/chat/completions HTTP/1.1",  # absolute form: aiohttp's to judge
    b"POST  /v1/chat/completions HTTP/1.1",
    b"",
    b"\xff\xfe garbage",
])
def test_everything_else_goes_to_aiohttp(line: bytes) -> None:
    assert not is_fast(line)


class _Capture:
    """Parser callbacks that keep one request, as FastConnection does."""

    def __init__(self) -> None:
        self.req = ParsedRequest()
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.req.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _parse(raw: bytes) -> tuple[_Capture, httptools.HttpRequestParser]:
    cap = _Capture()
    parser = httptools.HttpRequestParser(cap)
    parser.feed_data(raw)
    cap.req.method = parser.get_method()
    cap.req.version = parser.get_http_version()
    assert cap.done
    return cap, parser


def test_a_chunked_request_is_reframed_with_its_length() -> None:
    raw = (b"POST /admin/reload?x=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
           b"X-Thing: 1\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    cap, _ = _parse(raw)
    again, parser = _parse(cap.req.reframed())
    assert again.req.url == b"/admin/reload?x=1"
    assert b"".join(again.req.body) == b"abcde"
    names = [n.lower() for n, _ in again.req.headers]
    assert b"transfer-encoding" not in names
    assert (b"Content-Length", b"5") in again.req.headers
    assert (b"X-Thing", b"1") in again.req.headers
    assert parser.get_method() == b"POST"


def test_a_get_keeps_its_version_and_gets_no_body() -> None:
    cap, _ = _parse(b"GET /v1/models HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    framed = cap.req.reframed()
    assert framed.startswith(b"GET /v1/models HTTP/1.0\r\n")
    assert b"Content-Length" not in framed
    assert framed.endswith(b"Connection: keep-alive\r\n\r\n")
