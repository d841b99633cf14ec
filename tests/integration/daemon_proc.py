"""Run the real daemon (`llm-supervisor serve`) as a child process for a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.fakes.spawn import LLAMA_SERVER, free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_MODELFILE = REPO / "modelfiles" / "gemma3-270m.Modelfile"


def fake_model(name: str = "fake", *, fake_args: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
    """A model entry whose engine is the fake llama-server."""
    entry: dict[str, Any] = {
        "name": name,
        "modelfile": str(DEMO_MODELFILE),
        "command": [sys.executable, LLAMA_SERVER, *fake_args],
        "replicas": 2,
        "slots": 2,
        "warmup": False,
        "canary_interval": 0,
        "stop_grace": 2,
        "health": {"interval": 0.25, "timeout": 0.5, "failures": 2},
    }
    entry.update(kw)
    return entry


class DaemonProc:
    """`llm-supervisor serve -c <tmp>/supervisor.yaml`, with helpers to poke it."""

    def __init__(self, tmp: Path, models: list[dict[str, Any]], **server: Any) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.config_path = tmp / "supervisor.yaml"
        self.server = {"port": self.port, "state_dir": str(tmp / "state"),
                       "log_dir": str(tmp / "logs"), "cache_dir": str(REPO / "cache"),
                       "backoff_initial": 0.2, "drain_timeout": 5, **server}
        self.write(models)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, models: list[dict[str, Any]]) -> None:
        self.config_path.write_text(yaml.safe_dump({"server": self.server, "models": models}))

    def start(self, env: dict[str, str] | None = None,
              args: tuple[str, ...] = ()) -> DaemonProc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.cli", "--log-level", "debug", "serve",
                 "-c", str(self.config_path), *args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                env={**os.environ, **(env or {})})
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log_text()}")

    def wait(self, pred: Any, timeout: float = 20.0, what: str = "condition") -> dict[str, Any]:
        """Poll /status until pred(status) is true; returns that status."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = self.status()
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)  # not listening yet
                continue
            if pred(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout}s; last status: "
                             f"{json.dumps(status)[:2000]}\n{self.log_text()[-3000:]}")

    def status(self) -> dict[str, Any]:
        req = urllib.request.Request(self.url + "/status")
        token = self.server.get("admin_token")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def replicas(self) -> list[dict[str, Any]]:
        return list(self.status()["replicas"])

    def child_pids(self) -> list[int]:
        return [r["pid"] for r in self.replicas() if r["pid"]]

    def descendants(self) -> list[int]:
        assert self.proc is not None
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def engine_call(port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Talk to a fake engine directly (its /fake/control and /fake/stats)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
