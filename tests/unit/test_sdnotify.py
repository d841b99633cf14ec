"""sd_notify datagrams, checked byte for byte on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket named by NOTIFY_SOCKET, as systemd would pass it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> bytes:
    """One datagram."""
    return sock.recv(4096)


def test_ready_sends_ready(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready() is True
    assert received(notify_socket) == b"READY=1"


def test_ready_with_status(notify_socket: socket.socket) -> None:
    Notifier().ready("serving 3 models on 2 GPUs")
    assert received(notify_socket) == b"READY=1\nSTATUS=serving 3 models on 2 GPUs"


def test_status_is_one_line(notify_socket: socket.socket) -> None:
    Notifier().status("loading\nllama3.3-70b")
    assert received(notify_socket) == b"STATUS=loading llama3.3-70b"


def test_status_utf8(notify_socket: socket.socket) -> None:
    Notifier().status("2/3 replicas · ready")
    assert received(notify_socket) == "STATUS=2/3 replicas · ready".encode()


def test_watchdog_and_stopping(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    notifier.watchdog()
    notifier.stopping()
    assert received(notify_socket) == b"WATCHDOG=1"
    assert received(notify_socket) == b"STOPPING=1"


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(notify_socket).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_extend_timeout(notify_socket: socket.socket) -> None:
    Notifier().extend_timeout(90)
    assert received(notify_socket) == b"EXTEND_TIMEOUT_USEC=90000000"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"llm-supervisor-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready("up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False


def test_send_error_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    caplog.set_level("DEBUG", logger="supervisor.sdnotify")
    assert Notifier().ready() is False
    assert "failed to notify systemd" in caplog.text


def test_unsupported_address_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False


def test_explicit_environ_mapping(tmp_path: Path) -> None:
    path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        Notifier({"NOTIFY_SOCKET": str(path)}).watchdog()
        assert sock.recv(64) == b"WATCHDOG=1"


def test_unset_environment_hides_socket_from_children(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = Notifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ
    notifier.ready()
    assert received(notify_socket) == b"READY=1"
    assert notifier.watchdog_interval() == 15.0


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000", None, 0.0005),
        ("0", None, None),
        ("", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert Notifier().watchdog_interval() == expected
