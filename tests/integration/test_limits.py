"""Connection limits of the real daemon: slow heads, slow bodies, too many sockets.

A misbehaving client gets an OpenAI-shaped error and loses its connection; requests from
everyone else keep being served while it misbehaves.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_proc import DaemonProc, fake_model, wait_gone

CHAT = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 2}).encode()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, [fake_model(replicas=1, fake_args=("--fake-token-rate", "0"))],
                   header_timeout=0.5, body_timeout=0.5, max_connections=4).start()
    try:
        d.wait_ready()
        yield d
    finally:
        pids = d.descendants()
        d.stop()
        assert wait_gone(pids) == []


def port_of(d: DaemonProc) -> int:
    return int(d.url.rsplit(":", 1)[1])


def chat_ok(d: DaemonProc) -> bool:
    req = urllib.request.Request(d.url + "/v1/chat/completions", data=CHAT,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status == 200 and bool(json.loads(resp.read())["choices"])


def connections(d: DaemonProc) -> dict[str, int]:
    with urllib.request.urlopen(d.url + "/status", timeout=10) as resp:
        conns: dict[str, int] = json.loads(resp.read())["connections"]
    return conns


def read_answer(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of an answer after which the daemon closes the connection.

    Reads to EOF: a connection left open fails the test with a socket timeout.
    """
    sock.settimeout(timeout)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def test_a_head_that_never_completes_gets_408_and_others_are_served(daemon: DaemonProc) -> None:
    slow = socket.create_connection(("127.0.0.1", port_of(daemon)))
    started = time.monotonic()
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # no blank line
    assert chat_ok(daemon)  # served while the slow head is pending
    status, body = read_answer(slow)
    waited = time.monotonic() - started
    slow.close()
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert 0.4 <= waited < 4.0
    assert chat_ok(daemon)
    assert connections(daemon)["head_timeouts"] == 1


def test_a_connection_that_sends_nothing_is_closed_too(daemon: DaemonProc) -> None:
    idle = socket.create_connection(("127.0.0.1", port_of(daemon)))
    status, body = read_answer(idle)
    idle.close()
    assert status == 408 and "no complete request head" in body["error"]["message"]


def test_a_complete_head_is_not_cut_by_the_head_timer(daemon: DaemonProc) -> None:
    """A kept-alive connection outlives header_timeout once its first head is in."""
    sock = socket.create_connection(("127.0.0.1", port_of(daemon)))
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
    sock.settimeout(5)
    for _ in range(2):
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        time.sleep(0.8)  # longer than header_timeout, shorter than idle_timeout
    sock.close()


def test_a_body_that_stops_arriving_gets_408(daemon: DaemonProc) -> None:
    sock = socket.create_connection(("127.0.0.1", port_of(daemon)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\":")
    assert chat_ok(daemon)
    status, body = read_answer(sock)
    sock.close()
    assert status == 408
    assert "request body did not arrive" in body["error"]["message"]


def test_connections_past_the_limit_are_refused_with_503(daemon: DaemonProc) -> None:
    held = [socket.create_connection(("127.0.0.1", port_of(daemon))) for _ in range(4)]
    time.sleep(0.1)  # all four accepted
    extra = socket.create_connection(("127.0.0.1", port_of(daemon)))
    status, body = read_answer(extra)
    extra.close()
    assert status == 503
    assert body["error"]["code"] == "overloaded"
    assert "max_connections" in body["error"]["message"]
    for s in held:
        s.close()
    time.sleep(0.1)  # the daemon saw them go
    assert chat_ok(daemon)
    conns = connections(daemon)
    assert conns["refused"] == 1
    assert 1 <= conns["open"] <= 2  # this /status request (and chat_ok's, if not yet gone)
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "llm_supervisor_client_connections_refused_total 1.0" in text


def test_a_later_head_that_never_ends_is_refused_before_it_fills_memory(
        daemon: DaemonProc) -> None:
    """After a first request, a head that keeps growing is cut off at 1 MiB with a 431."""
    sock = socket.create_connection(("127.0.0.1", port_of(daemon)))
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
    sock.settimeout(5)
    sock.sendall(request)
    answer = b""
    while b'"choices"' not in answer:
        answer += sock.recv(65536)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nX-Filler: ")
    for _ in range(24):  # 1.5 MiB of one header value, never ended
        sock.sendall(b"a" * 65536)
    status, body = read_answer(sock)  # to EOF: the daemon closes after answering
    sock.close()
    assert status == 431
    assert body["error"]["code"] == "request_header_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert chat_ok(daemon)
