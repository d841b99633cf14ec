"""Start a fake engine as a real child process and wait until it listens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

FAKES_DIR = Path(__file__).resolve().parent
LLAMA_SERVER = str(FAKES_DIR / "fake_llama_server.py")
OLLAMA = str(FAKES_DIR / "fake_ollama.py")

# inherited settings that would silently change a fake's behaviour
_SCRUBBED_PREFIXES = ("FAKE_", "OLLAMA_", "LLAMA_ARG_", "LLAMA_API_KEY")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def script_path(script: str) -> Path:
    """A fake's path: an existing path, or a name in tests/fakes ("fake_ollama[.py]")."""
    path = Path(script)
    if path.exists():
        return path.resolve()
    name = script if script.endswith(".py") else f"{script}.py"
    candidate = FAKES_DIR / name
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"no fake named {script!r} (looked in {FAKES_DIR})")


class FakeProc:
    """A running fake: its port, its Popen, its log; stop() kills its whole process group."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, host: str, log_path: Path,
                 log_file: Any) -> None:
        self.proc = proc
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        self._log_file = log_file
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the fake wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        """Signal the fake's process (not the group)."""
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 5.0) -> int:
        """Wait for the fake to exit; its return code."""
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> int | None:
        """Send `sig` to the process group, reap the child, drop the log; the return code."""
        if not self._stopped:
            self._stopped = True
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            self._log_file.close()
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    # small synchronous HTTP helpers, handy from any test

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 5.0) -> tuple[int, Any]:
        """One HTTP request; (status, parsed JSON or text). Errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
            e.close()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stats(self) -> dict[str, Any]:
        """GET /fake/stats."""
        status, body = self.request("GET", "/fake/stats")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"/fake/stats answered {status}: {body!r}")
        return body

    def control(self, **changes: Any) -> dict[str, Any]:
        """POST /fake/control with the given keys."""
        status, body = self.request("POST", "/fake/control", changes)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"/fake/control answered {status}: {body!r}")
        return body

    def __enter__(self) -> FakeProc:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> FakeProc:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FakeProc pid={self.proc.pid} url={self.url} alive={self.alive}>"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as e:
        e.close()
        return False
    except (OSError, ValueError):
        return False


def start_fake(script: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
               ready_path: str | None = "/health", timeout: float = 10.0, *,
               port: int | None = None, host: str = "127.0.0.1") -> FakeProc:
    """Spawn a fake and wait until `ready_path` answers 200 (None: until it accepts connections).

    The port goes in the way the real engine takes it: `--host/--port` appended for
    fake_llama_server (so do not pass them), `OLLAMA_HOST` for fake_ollama (and `serve` is
    prepended when missing; use ready_path="/" for it). Inherited FAKE_*, OLLAMA_* and
    LLAMA_ARG_* variables are dropped so a test sees only the `env` it passes.
    """
    path = script_path(script)
    port = free_port(host) if port is None else port
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    child_env["PYTHONUNBUFFERED"] = "1"
    argv = list(args)
    if "ollama" in path.name:
        child_env["OLLAMA_HOST"] = f"{host}:{port}"
        if "serve" not in argv:
            argv.insert(0, "serve")
    else:
        argv += ["--host", host, "--port", str(port)]
    child_env.update(env or {})
    fd, log_name = tempfile.mkstemp(prefix=f"{path.stem}-{port}-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    log_file = open(log_path, "ab")  # closed by FakeProc.stop
    try:
        proc = subprocess.Popen(
            [sys.executable, str(path), *argv], env=child_env, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    except BaseException:
        log_file.close()
        log_path.unlink(missing_ok=True)
        raise
    fake = FakeProc(proc, port, host, log_path, log_file)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{path.name} exited with {proc.returncode} before it was "
                                   f"ready:\n{fake.log_text()}")
            if ready_path is None:
                if _listening(host, port):
                    return fake
            elif _answers(fake.url + ready_path, timeout=1.0):
                return fake
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path.name} on port {port} not ready after {timeout}s:\n"
                                   f"{fake.log_text()}")
            time.sleep(0.02)
    except BaseException:
        fake.stop()
        raise


def start_llama(args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                **kw: Any) -> FakeProc:
    """start_fake for fake_llama_server (ready when /health is 200)."""
    return start_fake(LLAMA_SERVER, args, env, **kw)


def start_ollama(env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 **kw: Any) -> FakeProc:
    """start_fake for fake_ollama (ready when / answers)."""
    kw.setdefault("ready_path", "/")
    return start_fake(OLLAMA, args, env, **kw)
