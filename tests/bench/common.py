"""Shared pieces of the benchmarks: the daemon and HAProxy as child processes, clients, stats."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = REPO / "tests" / "fakes" / "fake_llama_server.py"
MODELFILE = REPO / "modelfiles" / "gemma3-270m.Modelfile"
HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"
MODEL = "fake"


# ---- small things ---------------------------------------------------------------------------


def use_uvloop() -> bool:
    """Make asyncio.run use uvloop when it is installed (the daemon does too)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the `finally` that kills children runs."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE (what `ulimit -n` says)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation, like numpy's default."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return float(data[lo])
    return float(data[lo] + (data[hi] - data[lo]) * (k - lo))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of some samples (same unit as the samples)."""
    if not values:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan,
                "max": math.nan}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": max(values)}


def fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    """A number for a table cell; '-' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns left-aligned and padded."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write results as JSON (NaN becomes null)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=True) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def chat_body(max_tokens: int, stream: bool = False, text: str = "Say hi.") -> dict[str, Any]:
    """A small OpenAI chat request for the fake model."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return body


def ensure_tool(binary: str, package: str, install: bool = True) -> str | None:
    """The path of `binary`; installs `package` with apt-get when missing and allowed."""
    found = shutil.which(binary)
    if found or not install:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        return None
    cmd = [apt, "install", "-y", "-q", package]
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            return None
        cmd = [sudo, "-n", *cmd]
    print(f"installing {package}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"could not install {package}: {exc}", flush=True)
        return None
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        print(f"could not install {package} (apt-get exit {done.returncode}): "
              f"{' | '.join(tail)}", flush=True)
    return shutil.which(binary)


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the child, wait, then SIGKILL its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _kill_pids(pids: Sequence[int]) -> None:
    """SIGKILL the processes that are still alive (by pid; checked with psutil)."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()


# ---- the daemon -----------------------------------------------------------------------------


class Daemon:
    """`llm-supervisor serve -c <workdir>/supervisor.yaml` with fake engines; stop() kills all."""

    def __init__(self, workdir: Path, *, fake_args: Sequence[str], replicas: int = 2,
                 slots: int = 64, model: dict[str, Any] | None = None,
                 server: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "supervisor.yaml"
        entry: dict[str, Any] = {
            "name": MODEL, "modelfile": str(MODELFILE),
            "command": [sys.executable, str(FAKE_ENGINE), *fake_args],
            "replicas": replicas, "slots": slots, "canary_interval": 0, "warmup": False,
            "stop_grace": 2, **(model or {}),
        }
        conf = {"port": self.port, "state_dir": str(workdir / "state"),
                "log_dir": str(workdir / "logs"), "cache_dir": str(REPO / "cache"),
                "drain_timeout": 2, **(server or {})}
        self.config_path.write_text(yaml.safe_dump({"server": conf, "models": [entry]}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[int] = []

    def start(self, timeout: float = 60.0) -> Daemon:
        exe = Path(sys.executable).with_name("llm-supervisor")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "supervisor.cli"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*cmd, "serve", "-c", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        self.wait_ready(timeout)
        self.children = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until every replica is READY (/ready says 200 at the first one)."""
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                replicas = get_json(self.url + "/status", timeout=1).get("replicas") or []
                if replicas and all(r.get("state") == "READY" for r in replicas):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {timeout:g}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        return get_json(self.url + "/status")

    def engine_ports(self) -> list[int]:
        """The ports of the READY replicas (the fake engines), in replica order."""
        return [int(r["port"]) for r in self.status()["replicas"]
                if r.get("state") == "READY" and r.get("port")]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the daemon process itself (not its children)."""
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            self.children += [p.pid for p in
                              psutil.Process(self.proc.pid).children(recursive=True)]
        _kill_group(self.proc, timeout=15.0)
        _kill_pids(self.children)
        self.proc = None

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---- HAProxy --------------------------------------------------------------------------------


class HAProxy:
    """`haproxy -f cfg -db`: HTTP mode, leastconn over the given engine ports."""

    def __init__(self, binary: str, workdir: Path, backends: Sequence[int]) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cfg_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        # each proxied connection holds two descriptors (client side, server side)
        self.maxconn = max(64, min(20000, (open_files_limit() - 256) // 2))
        servers = "\n".join(f"    server e{i} {HOST}:{port}" for i, port in enumerate(backends))
        self.cfg_path.write_text(f"""\
global
    maxconn {self.maxconn}

defaults
    mode http
    option http-keep-alive
    option http-no-delay
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind {HOST}:{self.port}
    default_backend engines

backend engines
    balance leastconn
{servers}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-f", str(self.cfg_path), "-db"],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            log_text = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"haproxy did not start: {exc}\n{log_text}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, timeout=5.0)
            self.proc = None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---- a lean blocking HTTP/1.1 client (for latency: the least client noise) --------------------


class RawClient:
    """One keep-alive HTTP/1.1 connection; POST pre-encoded JSON, read the whole answer."""

    def __init__(self, port: int, path: str = CHAT) -> None:
        self.port = port
        self.path = path
        self.sock: socket.socket | None = None
        self.rfile: Any = None

    def _connect(self) -> None:
        self.close()
        sock = socket.create_connection((HOST, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=65536)

    def request_bytes(self, body: bytes) -> bytes:
        return (f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    def post(self, request: bytes) -> tuple[int, bytes]:
        """Send one request (from request_bytes); returns (status, body). Reconnects once."""
        for attempt in range(2):
            if self.sock is None:
                self._connect()
            assert self.sock is not None
            try:
                self.sock.sendall(request)
                return self._read()
            except (OSError, ValueError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _read(self) -> tuple[int, bytes]:
        rfile = self.rfile
        line = rfile.readline()
        if not line:
            raise ConnectionResetError("connection closed before a response")
        status = int(line.split(b" ", 2)[1])
        length = -1
        chunked = close = False
        while True:
            line = rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while True:
                size = int(rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(rfile.read(size))
                rfile.readline()
            body = b"".join(parts)
        elif length >= 0:
            body = rfile.read(length)
        else:
            body = rfile.read()
            close = True
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.rfile is not None:
            with contextlib.suppress(OSError):
                self.rfile.close()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.rfile = None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection pauses in the client while it times requests."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- an async load generator (aiohttp) --------------------------------------------------------


@dataclass
class LoadResult:
    """What a closed-loop load run did; latency_ms holds p50/p90/p99 when known."""

    tool: str
    requests: int
    errors: int
    seconds: float
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


async def closed_loop(url: str, body: dict[str, Any], *, concurrency: int,
                      duration: float) -> LoadResult:
    """`concurrency` workers that POST `body` back to back for `duration` seconds."""
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while loop.time() < stop_at:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = loop.time() - started
    summary = summarize(latencies)
    return LoadResult("aiohttp", len(latencies), errors, elapsed,
                      {k: summary[k] for k in ("p50", "p90", "p99")})


# ---- wrk ------------------------------------------------------------------------------------


def wrk_script(workdir: Path, body: dict[str, Any]) -> Path:
    """A Lua script that makes wrk POST the JSON body."""
    raw = json.dumps(body)
    assert "]]" not in raw
    path = workdir / "post.lua"
    path.write_text('wrk.method = "POST"\n'
                    f"wrk.body = [[{raw}]]\n"
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return math.nan
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(binary: str, url: str, script: Path, *, threads: int, connections: int,
            duration: float) -> LoadResult:
    """Run wrk once; requests, errors (non-2xx + socket errors), seconds from its report."""
    seconds = max(1, round(duration))
    cmd = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
           "-s", str(script), url]
    done = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=False,
                          start_new_session=True)
    out = done.stdout.decode(errors="replace")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): "
                           f"{out[-500:]} {done.stderr.decode(errors='replace')[-500:]}")
    requests = int(m.group(1))
    elapsed = _wrk_ms(m.group(2) + m.group(3)) / 1000
    errors = 0
    if e := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(e.group(1))
    if e := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        errors += sum(int(x) for x in e.groups())
    dist = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, flags=re.M))
    return LoadResult("wrk", requests - min(errors, requests), errors, elapsed,
                      {f"p{k}": _wrk_ms(v) for k, v in dist.items()})
