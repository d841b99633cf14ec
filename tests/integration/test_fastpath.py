"""The lean front door (`supervisor/fastpath.py`) against the real daemon, over raw sockets.

A connection whose first request line is `POST <completion route> HTTP/1.1` is served by
`FastConnection`; anything else on it later is handed to aiohttp. These tests drive both
halves over one socket, check the HTTP framing byte by byte, the limits (413, 408, 431, idle
close), auth and client disconnects, and finish with the OpenAI client.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.daemon_proc import DaemonProc, engine_call, fake_model, wait_gone

TOKEN_RATE = 50  # tokens per second from the fake engine: max_tokens=2 takes ~40 ms
MAX_BODY = 4096
BODY_TIMEOUT = 1.5  # longer than IDLE_TIMEOUT, as with the defaults (60 s and 30 s)
IDLE_TIMEOUT = 1.0
HEADER_TIMEOUT = 2.0
API_KEY = "sk-fastpath-test"
TOO_LARGE_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
GARBAGE = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 this is not HTTP \r\n\r\n"


# ---- raw HTTP over a socket -----------------------------------------------------------------


def chat(max_tokens: int = 2, *, stream: bool = False, content: str = "hi") -> bytes:
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "stream": stream}).encode()


def prompt(max_tokens: int = 2) -> bytes:
    return json.dumps({"model": "fake", "prompt": "once upon a time",
                       "max_tokens": max_tokens}).encode()


def embed() -> bytes:
    return json.dumps({"model": "fake", "input": ["a", "b"]}).encode()


def http(path: str = "/v1/chat/completions", body: bytes | None = None, *,
         method: str = "POST", version: str = "1.1",
         headers: Mapping[str, str] | None = None, chunk_size: int | None = None) -> bytes:
    """One request as bytes. A POST without `body` carries a small chat request.

    `chunk_size` sends the body with `Transfer-Encoding: chunked` in pieces of that size.
    """
    if body is None and method == "POST":
        body = chat()
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if body is not None:
        lines.append("Content-Type: application/json")
        if chunk_size is None:
            lines.append(f"Content-Length: {len(body)}")
        else:
            lines.append("Transfer-Encoding: chunked")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if body is None:
        return head
    if chunk_size is None:
        return head + body
    return head + chunked(body, chunk_size) + b"0\r\n\r\n"


def chunked(data: bytes, size: int) -> bytes:
    """`data` as chunks of `size` bytes, without the terminating zero-size chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size))


class Closed(AssertionError):
    """The daemon closed the connection where an answer (or more of one) was due."""


@dataclass
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)  # the data chunks, when chunked

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closing(self) -> bool:
        return (self.header("Connection") or "").lower() == "close"


class Conn:
    """A raw client connection to the daemon that reads answers with strict framing."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            piece = self.sock.recv(65536)
        except ConnectionResetError:
            piece = b""
        if not piece:
            raise Closed(f"connection closed; unread bytes: {self.buf[:200]!r}")
        self.buf += piece

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self, timeout: float = 10.0) -> Response:
        """The status line and headers of the next answer (an interim 1xx one included)."""
        self.sock.settimeout(timeout)
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        return Response(version, int(status), headers)

    def chunk(self) -> bytes:
        """One chunk of a chunked body (b"" for the last one, whose trailers are read)."""
        size_line = self._until(b"\r\n")
        size = int(size_line, 16)  # the daemon sends no chunk extensions
        if size == 0:
            while self._until(b"\r\n"):
                pass  # trailers, up to the empty line
            return b""
        data = self._exact(size)
        assert self._exact(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    def body(self, resp: Response) -> Response:
        """Read `resp`'s body as its headers frame it."""
        if resp.status < 200 or resp.status in (204, 304):
            return resp
        if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
            assert resp.header("Content-Length") is None
            while piece := self.chunk():
                resp.chunks.append(piece)
            resp.body = b"".join(resp.chunks)
        elif (length := resp.header("Content-Length")) is not None:
            resp.body = self._exact(int(length))
        else:
            resp.body = self.rest()
        return resp

    def response(self, timeout: float = 10.0) -> Response:
        """The next whole answer; a 1xx interim answer is returned on its own."""
        return self.body(self.head(timeout))

    def rest(self, timeout: float = 10.0) -> bytes:
        """Everything up to EOF; a connection left open fails with a socket timeout."""
        self.sock.settimeout(timeout)
        while True:
            try:
                self._fill()
            except Closed:
                out, self.buf = self.buf, b""
                return out

    def expect_eof(self, timeout: float = 5.0) -> None:
        extra = self.rest(timeout)
        assert extra == b"", f"bytes after the last answer: {extra[:300]!r}"


def sse_events(body: bytes) -> list[str]:
    text = body.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def assert_chat(resp: Response, *, closing: bool = False) -> dict[str, Any]:
    """A whole chat answer: 200, framed by Content-Length, JSON with choices."""
    assert resp.status == 200, (resp.status, resp.body[:500])
    assert resp.header("Content-Length") == str(len(resp.body))
    assert resp.header("Transfer-Encoding") is None
    assert resp.header("Date")
    assert (resp.header("Content-Type") or "").startswith("application/json")
    assert resp.closing is closing, resp.headers
    data: dict[str, Any] = resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    return data


def assert_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped JSON error answer."""
    assert resp.status == status, (resp.status, resp.body[:500])
    assert (resp.header("Content-Type") or "").startswith("application/json")
    assert resp.header("Content-Length") == str(len(resp.body))
    data = resp.json()
    assert set(data) == {"error"}
    error: dict[str, Any] = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_stream(resp: Response) -> list[dict[str, Any]]:
    """A streamed chat answer: chunked SSE ending with [DONE]; returns the JSON events."""
    assert resp.status == 200, (resp.status, resp.body[:500])
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.header("Content-Length") is None
    assert resp.header("Content-Type") == "text/event-stream"
    assert resp.header("Date")
    events = sse_events(resp.body)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    return chunks


# ---- the daemons ----------------------------------------------------------------------------


def start_daemon(tmp: Path, **server: Any) -> DaemonProc:
    d = DaemonProc(tmp, [fake_model(replicas=1, slots=4,
                                    fake_args=("--fake-token-rate", str(TOKEN_RATE)))],
                   **server).start()
    try:
        d.wait_ready()
    except BaseException:
        d.stop()
        raise
    return d


def stop_daemon(d: DaemonProc) -> None:
    pids = d.descendants()
    assert d.stop() == 0, d.log_text()[-3000:]
    assert wait_gone(pids) == []


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = start_daemon(tmp_path_factory.mktemp("fastpath"), header_timeout=HEADER_TIMEOUT,
                     body_timeout=BODY_TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                     max_body_bytes=MAX_BODY)
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = start_daemon(tmp_path_factory.mktemp("fastpath-keyed"), api_keys=[API_KEY])
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture
def conn(daemon: DaemonProc) -> Iterator[Conn]:
    with Conn(daemon.port) as c:
        yield c


def served(d: DaemonProc) -> None:
    """Another client, on its own fast connection, gets a chat answer."""
    with Conn(d.port) as other:
        other.send(http(headers={"Connection": "close"}))
        assert_chat(other.response(), closing=True)
        other.expect_eof()


def in_flight(d: DaemonProc) -> int:
    return int(d.replicas()[0]["in_flight"])


def engine_processing(d: DaemonProc) -> int:
    return int(engine_call(d.replicas()[0]["port"], "/fake/stats")["processing"])


def poll(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.05)


# ---- keep-alive, pipelining, handover ---------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_socket(conn: Conn) -> None:
    ids = set()
    for n in (1, 2, 3, 4):
        conn.send(http(body=chat(n)))
        data = assert_chat(conn.response())
        assert data["usage"]["completion_tokens"] == n
        ids.add(data["id"])
    assert len(ids) == 4  # four answers, not one answer read four times


def test_the_first_request_line_may_arrive_in_pieces(conn: Conn) -> None:
    raw = http()
    for piece in (raw[:7], raw[7:20], raw[20:60], raw[60:]):
        conn.send(piece)
        time.sleep(0.02)
    assert_chat(conn.response())


def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    conn.send(http(body=chat(6)) + http("/v1/completions", prompt(1))
              + http("/v1/embeddings", embed()))
    first, second, third = (conn.response() for _ in range(3))
    assert assert_chat(first)["usage"]["completion_tokens"] == 6
    assert second.status == 200 and second.json()["object"] == "text_completion"
    assert third.status == 200 and third.json()["object"] == "list"
    assert len(third.json()["data"]) == 2
    conn.send(http())  # and the connection is still in step
    assert_chat(conn.response())


def test_more_pipelined_requests_than_max_pipelined_are_all_answered(conn: Conn) -> None:
    """Past MAX_PIPELINED (8) queued requests reading pauses, and resumes as they are served."""
    for first in range(0, 20, 5):  # in four reads: some wait in the socket while paused
        conn.send(b"".join(http(body=chat(1 + i % 3)) for i in range(first, first + 5)))
        time.sleep(0.02)
    for i in range(20):
        assert assert_chat(conn.response())["usage"]["completion_tokens"] == 1 + i % 3


def test_backpressure_does_not_time_out_a_body_the_client_sent(conn: Conn) -> None:
    slow = http(body=chat(int(TOKEN_RATE * (BODY_TIMEOUT + 0.5))))  # takes 2 s to answer
    ninth = http(body=chat(1))
    conn.send(slow + b"".join(http(body=chat(1)) for _ in range(7)) + ninth[:-10])
    time.sleep(0.05)
    conn.send(ninth[-10:])  # the whole ninth request is sent now
    for _ in range(8):
        assert_chat(conn.response())
    last = conn.response()
    assert last.status == 200, last.body[:200]


def test_other_requests_on_a_fast_connection_are_handed_to_aiohttp(conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    conn.send(http("/v1/models", method="GET"))
    models = conn.response()
    assert models.status == 200
    assert [m["id"] for m in models.json()["data"]] == ["fake"]
    conn.send(http(body=chat(3)))  # now through aiohttp, re-framed
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 3
    conn.send(http("/status", method="GET"))
    status = conn.response()
    assert status.status == 200
    assert status.json()["replicas"][0]["model"] == "fake"
    conn.send(http("/v1/chat/completions", chat(2, stream=True)))
    assert_stream(conn.response())  # aiohttp streams too


def test_a_mixed_pipeline_keeps_its_order_across_the_handover(conn: Conn) -> None:
    conn.send(http(body=chat(4)) + http("/v1/models", method="GET") + http(body=chat(1))
              + http("/health", method="GET") + http("/v1/embeddings", embed()))
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 4
    assert conn.response().json()["object"] == "list"
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 1
    assert conn.response().json() == {"status": "ok"}
    assert len(conn.response().json()["data"]) == 2


def test_a_connection_that_opens_with_a_get_serves_chat_too(conn: Conn) -> None:
    conn.send(http("/v1/models", method="GET"))
    assert conn.response().json()["data"][0]["id"] == "fake"
    conn.send(http())
    assert_chat(conn.response())
    conn.send(http("/chat/completions"))
    assert_chat(conn.response())


def test_http_1_0_chat_is_answered(daemon: DaemonProc) -> None:
    with Conn(daemon.port) as first:  # HTTP/1.0 from the first byte: aiohttp
        first.send(http(version="1.0"))
        resp = first.response()
        assert resp.status == 200 and resp.json()["choices"]
        first.expect_eof()  # HTTP/1.0 without keep-alive: one request per connection
    with Conn(daemon.port) as later:  # HTTP/1.0 after a fast request: handed over
        later.send(http())
        assert_chat(later.response())
        later.send(http(body=chat(3), version="1.0"))
        resp = later.response()
        assert resp.status == 200 and resp.json()["usage"]["completion_tokens"] == 3
        later.expect_eof()


# ---- request bodies ---------------------------------------------------------------------------


def test_expect_100_continue_gets_an_interim_answer_before_the_body(conn: Conn) -> None:
    body = chat()
    head = http(body=body, headers={"Expect": "100-continue"})[:-len(body)]
    conn.send(head)
    interim = conn.head(timeout=2)
    assert interim.status == 100 and interim.headers == []
    conn.send(body)
    assert_chat(conn.response())
    # the next request on the same connection gets its own 100
    conn.send(head)
    assert conn.head(timeout=2).status == 100
    conn.send(body)
    assert_chat(conn.response())


def test_a_chunked_request_body_is_read_whole(conn: Conn) -> None:
    raw = http(body=chat(3), chunk_size=7)
    conn.send(raw[:len(raw) // 2])
    time.sleep(0.05)  # the body arrives in two reads
    conn.send(raw[len(raw) // 2:])
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 3
    conn.send(http(body=chat(1), chunk_size=1000))  # one chunk, then the next request
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 1


def test_expect_100_continue_after_a_handover_still_gets_an_answer(conn: Conn) -> None:
    """Once handed over, the fast parser sends no 100 before the body (it waits for the
    whole request); a client that sends the body anyway gets its answer, after aiohttp's
    belated 100."""
    conn.send(http() + http("/v1/models", method="GET"))
    assert_chat(conn.response())
    assert conn.response().status == 200
    body = chat(3)
    conn.send(http(body=body, headers={"Expect": "100-continue"})[:-len(body)])
    time.sleep(0.2)
    conn.send(body)
    resp = conn.response()
    if resp.status == 100:
        resp = conn.response()
    assert assert_chat(resp)["usage"]["completion_tokens"] == 3


def test_a_gzip_request_body_is_accepted_after_a_handover(conn: Conn) -> None:
    """The re-framed request keeps Content-Encoding; aiohttp inflates the body."""
    conn.send(http() + http("/health", method="GET"))
    assert_chat(conn.response())
    assert conn.response().json() == {"status": "ok"}
    conn.send(http(body=gzip.compress(chat(3)), headers={"Content-Encoding": "gzip"}))
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 3


def test_a_gzip_request_body_is_accepted_on_the_fast_path(conn: Conn) -> None:
    conn.send(http(body=gzip.compress(chat(3)), headers={"Content-Encoding": "gzip"}))
    resp = conn.response()
    assert assert_chat(resp)["usage"]["completion_tokens"] == 3


def test_an_upgrade_offer_gets_one_answer_that_reads_the_body(conn: Conn) -> None:
    conn.send(http(headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                            "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}))
    resp = conn.response()
    if resp.status == 200:  # served as if the offer were absent, as aiohttp does
        assert_chat(resp)
        conn.send(http())
        assert_chat(conn.response())
    else:  # or refused outright: one answer, then the close
        assert "upgrade" in assert_error(resp, 400)["message"]
        conn.expect_eof()


def test_an_oversized_request_head_is_refused(conn: Conn) -> None:
    # 16 KiB: past aiohttp's 8190, small enough to be read whole (no RST on the close);
    # the fast path takes 1 MB just as well.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.send(http(headers={"X-Filler": "a" * 16384}))
    resp = conn.response()
    assert resp.status in (400, 413, 431), resp.status
    assert_error(resp, resp.status)
    conn.expect_eof()


def test_a_body_too_large_by_content_length_gets_413_and_a_close(daemon: DaemonProc,
                                                                 conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    conn.send(TOO_LARGE_HEAD)
    resp = conn.response()
    error = assert_error(resp, 413, "request_too_large")
    assert str(MAX_BODY) in error["message"]
    assert resp.closing
    conn.expect_eof()
    with Conn(daemon.port) as first:  # the same as the very first request
        first.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 99999999\r\n\r\n")
        assert_error(first.response(), 413, "request_too_large")
        first.expect_eof()
    served(daemon)


def test_a_chunked_body_that_grows_too_large_gets_413_and_a_close(daemon: DaemonProc,
                                                                   conn: Conn) -> None:
    filler = b"x" * 1000
    conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + chunked(filler * 3, 1000))
    time.sleep(0.1)  # 3000 bytes are in and fine
    conn.send(chunked(filler + b"x" * (MAX_BODY - 4000 + 1), 2000))  # one byte too many
    resp = conn.response()
    assert_error(resp, 413, "request_too_large")
    assert resp.closing
    conn.expect_eof()
    served(daemon)


def test_malformed_json_gets_400_and_the_connection_stays_usable(conn: Conn) -> None:
    conn.send(http(body=b'{"model": "fake", "messages": [}'))
    resp = conn.response()
    error = assert_error(resp, 400)
    assert "not valid JSON" in error["message"]
    assert not resp.closing
    conn.send(http(body=b'["an array"]'))
    assert "JSON object" in assert_error(conn.response(), 400)["message"]
    conn.send(http(body=json.dumps({"model": "nope", "messages": []}).encode()))
    assert_error(conn.response(), 404, "model_not_found")
    conn.send(http(body=json.dumps({"model": "fake", "messages": []}).encode()))
    assert_error(conn.response(), 400, "invalid_request")
    conn.send(http())
    assert_chat(conn.response())


def test_garbage_after_a_request_gets_400_and_a_close(daemon: DaemonProc, conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    conn.send(GARBAGE)
    resp = conn.response()
    error = assert_error(resp, 400, "invalid_request")
    assert "malformed HTTP request" in error["message"]
    assert resp.closing
    conn.expect_eof()
    served(daemon)


def test_garbage_pipelined_behind_a_good_request_is_answered_after_it(conn: Conn) -> None:
    conn.send(http(body=chat(3)) + GARBAGE)
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 3
    assert_error(conn.response(), 400, "invalid_request")
    conn.expect_eof()


def test_a_refusal_behind_a_handed_over_request_ends_the_connection_promptly(
        daemon: DaemonProc) -> None:
    """aiohttp cannot send the fast path's refusal after its own answers: the request before
    the refusal is handed over with `Connection: close`, so the client gets every answer up
    to it and then EOF at once, not after aiohttp's keep-alive timer."""
    for refused in (GARBAGE, TOO_LARGE_HEAD):
        with Conn(daemon.port) as c:
            c.send(http() + http("/v1/models", method="GET") + refused)
            assert_chat(c.response())
            models = c.response()
            assert models.json()["object"] == "list" and models.closing
            started = time.monotonic()
            assert c.rest(timeout=IDLE_TIMEOUT + 3) == b""
            assert time.monotonic() - started < IDLE_TIMEOUT / 2


def test_an_oversized_body_after_a_handover_gets_413_at_once(daemon: DaemonProc,
                                                             conn: Conn) -> None:
    conn.send(http() + http("/v1/models", method="GET"))
    assert_chat(conn.response())
    assert conn.response().status == 200
    started = time.monotonic()
    conn.send(TOO_LARGE_HEAD)  # aiohttp's side now: it refuses on the declared length
    resp = conn.response(timeout=3)
    assert_error(resp, 413, "request_too_large")
    assert time.monotonic() - started < BODY_TIMEOUT  # not a 408 for the missing body
    conn.expect_eof(timeout=3)
    served(daemon)


# ---- disconnects, Connection: close, half-close --------------------------------------------


def test_a_client_gone_mid_stream_frees_its_slot(daemon: DaemonProc) -> None:
    poll(lambda: in_flight(daemon) == 0 and engine_processing(daemon) == 0, 3, "all idle")
    with Conn(daemon.port) as c:
        c.send(http(body=chat(TOKEN_RATE * 6, stream=True)))  # a 6 s stream
        resp = c.head()
        assert resp.status == 200
        assert c.chunk().startswith(b"data: ")
        assert in_flight(daemon) == 1 and engine_processing(daemon) == 1
    gone = time.monotonic()
    poll(lambda: in_flight(daemon) == 0, 3, "replica in_flight back to 0")
    poll(lambda: engine_processing(daemon) == 0, 3, "engine slot freed")
    assert time.monotonic() - gone < 3  # well before the stream would have ended
    served(daemon)
    poll(lambda: daemon.status()["connections"]["open"] == 1, 5,
         "only the /status connection open")


def test_a_client_that_resets_while_a_whole_answer_is_made_frees_its_slot(
        daemon: DaemonProc) -> None:
    with Conn(daemon.port) as c:
        c.send(http(body=chat(TOKEN_RATE * 6)))  # a 6 s generation, answered whole
        poll(lambda: in_flight(daemon) == 1, 3, "request in flight")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    poll(lambda: in_flight(daemon) == 0, 3, "replica in_flight back to 0")
    poll(lambda: engine_processing(daemon) == 0, 3, "engine slot freed")
    served(daemon)


def test_a_client_that_closes_its_side_is_gone_and_its_slot_frees(daemon: DaemonProc) -> None:
    """A FIN ends the request, as on aiohttp's side: clients that give up close their
    socket, and the engine slot must not stay busy until the generation ends."""
    with Conn(daemon.port) as c:
        c.send(http(body=chat(TOKEN_RATE * 6)))  # a 6 s generation, answered whole
        poll(lambda: in_flight(daemon) == 1, 3, "request in flight")
        c.sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert c.rest(timeout=5) == b""  # closed without an answer
        assert time.monotonic() - started < 3
    poll(lambda: in_flight(daemon) == 0, 3, "replica in_flight back to 0")
    poll(lambda: engine_processing(daemon) == 0, 3, "engine slot freed")
    with Conn(daemon.port) as c:  # the same after a handover: aiohttp learns of the EOF
        c.send(http() + http("/v1/models", method="GET"))
        assert_chat(c.response())
        assert c.response().json()["object"] == "list"
        c.sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        c.expect_eof(timeout=IDLE_TIMEOUT + 3)
        assert time.monotonic() - started < IDLE_TIMEOUT / 2
    served(daemon)


def test_connection_close_is_honoured(daemon: DaemonProc) -> None:
    with Conn(daemon.port) as c:  # on the first request
        c.send(http(headers={"Connection": "close"}))
        assert_chat(c.response(), closing=True)
        c.expect_eof()
    with Conn(daemon.port) as c:  # on a later one, streamed
        c.send(http())
        assert_chat(c.response())
        c.send(http(body=chat(stream=True), headers={"Connection": "close"}))
        resp = c.response()
        assert_stream(resp)
        assert resp.closing
        c.expect_eof()
    with Conn(daemon.port) as c:  # nothing after the request that closes is answered
        c.send(http(headers={"Connection": "close"}) + http())
        assert_chat(c.response(), closing=True)
        c.expect_eof()


# ---- timeouts -----------------------------------------------------------------------------------


def test_an_idle_fast_connection_is_closed_after_idle_timeout(conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    started = time.monotonic()
    conn.expect_eof(timeout=IDLE_TIMEOUT + 3)  # closed quietly: no answer, just EOF
    assert IDLE_TIMEOUT - 0.2 <= time.monotonic() - started < IDLE_TIMEOUT + 2


def test_a_second_head_that_never_completes_gets_408_after_idle_timeout(conn: Conn) -> None:
    """After an answer the idle timer bounds the wait for the next complete head."""
    conn.send(http())
    assert_chat(conn.response())
    conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # no blank line
    started = time.monotonic()
    resp = conn.response(timeout=IDLE_TIMEOUT + 3)
    assert "no complete request head" in assert_error(resp, 408, "request_timeout")["message"]
    assert time.monotonic() - started < IDLE_TIMEOUT + 2
    conn.expect_eof()


def test_a_second_body_that_stalls_gets_408_after_body_timeout(daemon: DaemonProc,
                                                               conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    raw = http(body=chat(3))
    conn.send(raw[:-10])  # the head and most of the body; the rest never comes
    started = time.monotonic()
    resp = conn.response(timeout=BODY_TIMEOUT + 3)
    waited = time.monotonic() - started
    error = assert_error(resp, 408, "request_timeout")
    assert "request body did not arrive" in error["message"]
    assert BODY_TIMEOUT - 0.2 <= waited < BODY_TIMEOUT + 2
    conn.expect_eof()
    served(daemon)


def test_a_body_slower_than_idle_timeout_is_read_once_its_head_is_in(conn: Conn) -> None:
    conn.send(http())
    assert_chat(conn.response())
    raw = http(body=chat(3))
    conn.send(raw[:-10])
    time.sleep(IDLE_TIMEOUT + 0.2)  # past idle_timeout, within body_timeout
    conn.send(raw[-10:])
    assert assert_chat(conn.response())["usage"]["completion_tokens"] == 3


def test_a_body_slower_than_idle_timeout_after_a_handover_is_read(conn: Conn) -> None:
    conn.send(http() + http("/v1/models", method="GET"))
    assert_chat(conn.response())
    assert conn.response().status == 200
    raw = http(body=chat(3))
    conn.send(raw[:-10])
    time.sleep(IDLE_TIMEOUT + 0.2)  # past idle_timeout, within body_timeout
    try:
        conn.send(raw[-10:])
        resp = conn.response()
    except (Closed, BrokenPipeError, ConnectionResetError) as exc:
        pytest.fail(f"closed while the body was arriving: {exc!r}")
    assert assert_chat(resp)["usage"]["completion_tokens"] == 3


def test_a_request_whose_head_came_early_is_not_cut_by_the_idle_timer(conn: Conn) -> None:
    slow = http(body=chat(int(TOKEN_RATE * (IDLE_TIMEOUT + 1)), stream=True))  # ~2.2 s
    conn.send(http() + slow[:-5])  # the second head is complete, its body is not
    assert_chat(conn.response())
    time.sleep(0.2)
    conn.send(slow[-5:])
    started = time.monotonic()
    resp = conn.head()
    assert resp.status == 200
    try:
        while piece := conn.chunk():
            resp.chunks.append(piece)
    except Closed:
        pytest.fail(f"the stream was cut after {time.monotonic() - started:.2f}s and "
                    f"{len(resp.chunks)} chunks (idle_timeout {IDLE_TIMEOUT}s)")
    resp.body = b"".join(resp.chunks)
    assert_stream(resp)


# ---- streaming, auth, routes --------------------------------------------------------------------


def test_a_streamed_answer_is_framed_and_the_socket_is_reused(conn: Conn) -> None:
    conn.send(http(body=chat(5, stream=True)))
    resp = conn.response()
    chunks = assert_stream(resp)
    assert resp.header("Cache-Control") == "no-cache"
    assert not resp.closing
    assert len(resp.chunks) >= 2  # relayed as it came, not buffered into one piece
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    conn.send(http("/v1/completions", prompt(2)))
    assert conn.response().json()["object"] == "text_completion"
    conn.send(http(body=chat(2, stream=True)))
    assert_stream(conn.response())


def test_api_keys_are_required_on_the_fast_path(keyed: DaemonProc) -> None:
    with Conn(keyed.port) as c:
        c.send(http())
        resp = c.response()
        assert_error(resp, 401, "invalid_api_key")
        assert not resp.closing  # a refused key does not end the connection
        c.send(http(headers={"Authorization": "Bearer wrong"}))
        assert_error(c.response(), 401, "invalid_api_key")
        c.send(http(headers={"Authorization": f"Bearer {API_KEY}"}))
        assert_chat(c.response())
        c.send(http(headers={"X-Api-Key": API_KEY}))
        assert_chat(c.response())
        c.send(http(headers={"authorization": f"bearer {API_KEY}"}))
        assert_chat(c.response())
        c.send(http("/chat/completions"))
        assert_error(c.response(), 401, "invalid_api_key")
        c.send(http("/chat/completions", headers={"X-Api-Key": API_KEY}))
        assert_chat(c.response())
        c.send(http("/embeddings", embed()))
        assert_error(c.response(), 401, "invalid_api_key")
        c.send(http("/v1/models", method="GET"))  # handed over: aiohttp's guard
        assert_error(c.response(), 401, "invalid_api_key")
        c.send(http())  # and a key is still needed on aiohttp's side
        assert_error(c.response(), 401, "invalid_api_key")
        c.send(http(headers={"X-Api-Key": API_KEY}))
        assert_chat(c.response())
    with Conn(keyed.port) as c:  # a stream is not started without a key either
        c.send(http("/completions", prompt()) + http(body=chat(stream=True)))
        assert_error(c.response(), 401, "invalid_api_key")
        assert_error(c.response(), 401, "invalid_api_key")


def test_query_strings_and_unprefixed_routes(conn: Conn) -> None:
    conn.send(http("/v1/chat/completions?x=1&y=%20"))
    assert_chat(conn.response())
    conn.send(http("/chat/completions"))
    assert_chat(conn.response())
    conn.send(http("/v1/completions", prompt(3)))
    resp = conn.response()
    assert resp.status == 200
    data = resp.json()
    assert data["object"] == "text_completion" and data["usage"]["completion_tokens"] == 3
    conn.send(http("/completions?stream=no", prompt(1)))
    assert conn.response().json()["object"] == "text_completion"
    conn.send(http("/embeddings", embed()))
    assert len(conn.response().json()["data"]) == 2


def test_a_first_request_with_a_query_string_takes_the_fast_path(daemon: DaemonProc) -> None:
    with Conn(daemon.port) as c:
        c.send(http("/v1/chat/completions?x=1") + GARBAGE)
        assert_chat(c.response())
        # only the fast path answers garbage with its own message (aiohttp says otherwise)
        assert "malformed HTTP request" in assert_error(c.response(), 400)["message"]


# ---- the OpenAI client --------------------------------------------------------------------------


def test_the_openai_client_works_through_the_fast_path(daemon: DaemonProc) -> None:
    def local_addr(raw: Any) -> Any:
        return raw.http_response.extensions["network_stream"].get_extra_info("client_addr")

    # Sequential requests take the pool's one idle connection: the same socket each time.
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0,
                       http_client=openai.DefaultHttpxClient(trust_env=False)) as client:
        messages: Any = [{"role": "user", "content": "hello"}]
        raw = client.chat.completions.with_raw_response.create(
            model="fake", messages=messages, max_tokens=4)
        whole = raw.parse()
        assert whole.choices[0].message.content
        assert whole.usage is not None and whole.usage.completion_tokens == 4
        listed = client.models.with_raw_response.list()
        assert [m.id for m in listed.parse().data] == ["fake"]
        # the same pooled connection: chat on the fast path, then handed over to aiohttp
        assert local_addr(listed) == local_addr(raw)
        again = client.chat.completions.with_raw_response.create(
            model="fake", messages=messages, max_tokens=2)
        assert again.parse().choices[0].message.content
        assert local_addr(again) == local_addr(raw)
        # The client stops reading at `data: [DONE]` and closes the response, so the
        # connection may not be reused after a stream: no check on it here.
        for max_tokens in (4, 1):
            pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="fake", messages=messages, max_tokens=max_tokens, stream=True)
                if c.choices]
            assert "".join(pieces) == whole.choices[0].message.content[:len("".join(pieces))]
            assert len(pieces) >= max_tokens
        assert client.models.retrieve("fake").id == "fake"
