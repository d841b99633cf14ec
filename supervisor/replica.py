"""One replica: a child engine process and the single task that owns its state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .backends.base import Backend, Launch, LaunchRequest
from .config import ModelConfig, ServerConfig
from .events import Events
from .modelfile import Modelfile
from .ollama_residency import OllamaError, OllamaResidency, with_num_ctx
from .probes import Prober
from .process import Child, Runner, tail, terminate
from .states import State, check_transition

logger = logging.getLogger(__name__)

TICK = 0.25
HANG_CAUSES = frozenset({"process", "health", "stall", "canary"})


class Clock(Protocol):
    """Time, injectable: `now` for deadlines, `sleep` for waits."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica runs and where."""

    id: str
    model: ModelConfig
    modelfile: Modelfile
    model_path: Path
    gpu_indexes: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    cpu_set: tuple[int, ...] = ()
    threads: int = 1
    hosted: tuple[tuple[ModelConfig, Modelfile, Path], ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model.name, *(m.name for m, _, _ in self.hosted))


@dataclass(frozen=True)
class Command:
    """A request to the owner task."""

    kind: str  # start | stop | restart | drain | hang | exit
    cause: str = ""
    detail: str = ""
    done: asyncio.Future[None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Failure:
    """Why a replica stopped serving."""

    cause: str  # boot | crash | process | health | stall | canary
    message: str


class Replica:
    """A supervised engine process. Only `run` changes `state`; others send commands."""

    def __init__(
        self, spec: ReplicaSpec, backend: Backend, runner: Runner, prober: Prober,
        server: ServerConfig, events: Events, *, clock: Clock | None = None,
        port_alloc: Callable[[], int] = free_port,
        residency: OllamaResidency | None = None,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.runner = runner
        self.prober = prober
        self.server = server
        self.events = events
        self.clock = clock or MonotonicClock()
        self.port_alloc = port_alloc
        self.residency = residency if spec.model.engine == "ollama" else None
        self.evictions = 0
        self.state = State.STOPPED
        self.launch: Launch | None = None
        self.child: Child | None = None
        self.in_flight = 0
        self.draining = False
        self.restarts = 0
        self.reason: str | None = None
        self.ready_since: float | None = None
        self.last_activity = self.clock.now()
        self.tokens_out = 0
        self.served = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._failures: deque[float] = deque()
        self._consecutive = 0
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._state_changed = asyncio.Event()
        self.listeners: list[Callable[[Replica], None]] = []
        self.log_path = server.log_dir / (spec.id.replace("/", "-") + ".log")

    # ---- read side (anyone) -------------------------------------------------

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def model(self) -> ModelConfig:
        return self.spec.model

    @property
    def base_url(self) -> str:
        assert self.launch is not None
        return self.launch.base_url

    @property
    def slots(self) -> int:
        return self.launch.slots if self.launch else self.spec.model.slots

    def accepts(self) -> bool:
        """Takes new requests: READY, not draining, and its process still there."""
        return (self.state is State.READY and not self.draining
                and self.child is not None and self.child.returncode is None)

    def note_tokens(self, n: int) -> None:
        """Record completion tokens relayed, for tokens/s in /status."""
        self.tokens_out += n
        self._rate.append((time.monotonic(), n))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 10.0]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / 10.0

    def snapshot(self) -> dict[str, object]:
        child = self.child
        return {
            "id": self.id,
            "model": self.spec.model.name,
            "models": list(self.spec.models),
            "engine": self.spec.model.engine,
            "state": self.state.value,
            "draining": self.draining,
            "pid": child.pid if child and child.returncode is None else None,
            "port": self.launch.port if self.launch else None,
            "gpus": list(self.spec.gpu_indexes),
            "cpus": list(self.spec.cpu_set),
            "uptime_s": round(self.clock.now() - self.ready_since, 1)
            if self.ready_since is not None and self.state is State.READY else 0.0,
            "restarts": self.restarts,
            "in_flight": self.in_flight,
            "requests": self.served,
            "slots": self.slots,
            "tokens_per_s": round(self.tokens_per_s(), 1),
            "reason": self.reason,
            "evictions": self.evictions,
            "log_tail": tail(self.log_path, 10) if self.state is State.FATAL else [],
        }

    async def wait_state(self, *states: State, timeout: float | None = None) -> State:
        """Wait until the replica is in one of `states`."""

        async def waiter() -> State:
            while self.state not in states:
                self._state_changed.clear()
                await self._state_changed.wait()
            return self.state

        return await asyncio.wait_for(waiter(), timeout)

    # ---- commands (anyone) ----------------------------------------------------

    def send(self, kind: str, cause: str = "", detail: str = "") -> asyncio.Future[None]:
        """Queue a command for the owner task; the future resolves when it is handled."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commands.put_nowait(Command(kind, cause, detail, done))
        return done

    def report_hang(self, cause: str, detail: str) -> None:
        """A request saw the engine stall (or fail); the owner decides."""
        self._commands.put_nowait(Command("hang", cause, detail))

    # ---- the owner task -----------------------------------------------------------

    def _move(self, dst: State, reason: str | None = None) -> None:
        check_transition(self.state, dst)
        logger.debug("replica %s %s -> %s", self.id, self.state.value, dst.value)
        self.state = dst
        if reason is not None or dst in (State.READY, State.STARTING):
            self.reason = reason
        self._state_changed.set()
        for listener in self.listeners:
            listener(self)

    async def _next_command(self, timeout: float) -> Command | None:
        if not self._commands.empty():
            return self._commands.get_nowait()
        getter = asyncio.ensure_future(self._commands.get())
        sleeper = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sleeper
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    @staticmethod
    def _finish(cmd: Command | None) -> None:
        if cmd is not None and cmd.done is not None and not cmd.done.done():
            cmd.done.set_result(None)

    async def run(self) -> None:
        """Own this replica until told to exit; always leaves the child stopped."""
        pending: Command | None = Command("start")
        try:
            while True:
                cmd = pending
                pending = None
                if cmd is None:
                    if self.state is State.BACKOFF:
                        cmd = await self._next_command(self._backoff_delay())
                        if cmd is None:
                            cmd = Command("start", "backoff")
                    else:
                        cmd = await self._commands.get()
                if cmd.kind == "exit":
                    self._finish(cmd)
                    return
                if cmd.kind in ("stop", "drain"):
                    if self.state is State.BACKOFF or self.state is State.FATAL:
                        self._move(State.STOPPED, "stopped")
                    self._finish(cmd)
                    continue
                if cmd.kind not in ("start", "restart"):
                    self._finish(cmd)
                    continue
                if self.state is State.FATAL:
                    self._failures.clear()
                    self._consecutive = 0
                if cmd.kind == "restart" or cmd.cause == "backoff":
                    self.restarts += 1
                self._finish(cmd)
                pending = await self._lifetime()
        finally:
            await self._kill_child()
            self.draining = False

    async def _lifetime(self) -> Command | None:
        """Boot, serve, and stop once; returns a command that ended it and wants handling."""
        outcome = await self._boot()
        if isinstance(outcome, Failure):
            await self._fail(outcome)
            return None
        if outcome is not None:
            return await self._stop_for(outcome)
        ended = await self._serve()
        if isinstance(ended, Failure):
            await self._fail(ended)
            return None
        return await self._stop_for(ended)

    async def _stop_for(self, cmd: Command) -> Command | None:
        """Stop the child because of cmd; a restart comes back to `run` as a start."""
        if cmd.kind == "drain":
            self.events.emit("drain", self.id, "draining", model=self.model.name)
            await self._drain()
        self._move(State.STOPPING, "stopping")
        await self._kill_child()
        self._move(State.STOPPED, "stopped")
        self.draining = False
        self._finish(cmd)
        if cmd.kind == "restart":
            return Command("restart", cmd.cause)
        if cmd.kind == "exit":
            return cmd
        return None

    async def _drain(self) -> None:
        self.draining = True
        deadline = self.clock.now() + self.server.drain_timeout
        while self.in_flight > 0 and self.clock.now() < deadline:
            await self.clock.sleep(TICK)

    async def _boot(self) -> Failure | Command | None:
        """STARTING until the engine answers health (and the warm-up); None once READY."""
        self._move(State.STARTING)
        port = self.port_alloc()
        self.launch = self.backend.launch(LaunchRequest(
            replica_id=self.id, model=self.spec.model, modelfile=self.spec.modelfile,
            model_path=self.spec.model_path, port=port, gpu_uuids=self.spec.gpu_uuids,
            tensor_split=self.spec.tensor_split, cpu_set=self.spec.cpu_set,
            threads=self.spec.threads, base_env=self._base_env(), hosted=self.spec.hosted,
        ))
        try:
            self.child = await self.runner.spawn(
                self.launch.argv, self.launch.env, self.log_path, self.spec.cpu_set)
        except OSError as exc:
            return Failure("boot", f"could not start {self.launch.argv[0]}: {exc}")
        logger.info("spawned %s pid %d on port %d", self.id, self.child.pid, port)
        self.events.emit("spawned", self.id, f"pid {self.child.pid} port {port}",
                         model=self.model.name)
        model = self.spec.model
        deadline = self.clock.now() + model.load_timeout
        health_url = self.launch.base_url + self.launch.health_path
        while True:
            if self.child.condition() is not None:
                return Failure("boot", f"exited with code {self.child.returncode} before ready"
                               + self._log_hint())
            if self.clock.now() >= deadline:
                return Failure("boot", f"not ready after {model.load_timeout:g}s"
                               + self._log_hint())
            if await self.prober.health(health_url, model.health.timeout):
                break
            cmd = await self._next_command(TICK)
            if cmd is not None and cmd.kind in ("stop", "drain", "exit", "restart"):
                return cmd
            self._finish(cmd)
        if self.residency is not None:
            outcome = await self._make_resident(deadline)
            if outcome is not None:
                return outcome
        if model.warmup:
            left = max(1.0, deadline - self.clock.now())
            if not await self.prober.canary(self.launch.base_url,
                                            self.backend.upstream_model(model), left):
                return Failure("boot", "warm-up completion failed" + self._log_hint())
        self._move(State.READY)
        self.ready_since = self.clock.now()
        self.last_activity = self.clock.now()
        logger.info("ready %s pid %d", self.id, self.child.pid)
        self.events.emit("ready", self.id, f"pid {self.child.pid}", model=self.model.name)
        return None

    async def _serve(self) -> Failure | Command:
        """READY (or UNHEALTHY) until a command or a failed liveness signal ends it."""
        model = self.spec.model
        assert self.launch is not None and self.child is not None
        health_url = self.launch.base_url + self.launch.health_path
        watcher = None
        if self.launch.progress_path is not None:
            watcher = asyncio.create_task(self._watch_progress(
                self.launch.base_url, self.launch.progress_path, model.stall_timeout * 2))
        try:
            return await self._serve_loop(health_url)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _watch_progress(self, base_url: str, path: str, timeout: float) -> None:
        """While busy, the engine's generation loop must answer `path` within `timeout`.

        A non-streaming request is not streamed from such an engine, so no byte shows its
        progress; llama-server serves /slots from the loop that generates, and a wedged
        generation leaves it unanswered while /health still says ok.
        """
        interval = self.spec.model.health.interval
        while True:
            await self.clock.sleep(interval)
            if self.in_flight == 0:
                continue
            if not await self.prober.answers(base_url + path, timeout) and self.in_flight > 0:
                self.report_hang("stall", f"busy, and the generation loop did not answer "
                                          f"{path} in {timeout:g}s")
                return

    async def _serve_loop(self, health_url: str) -> Failure | Command:
        model = self.spec.model
        assert self.launch is not None and self.child is not None
        next_health = self.clock.now() + model.health.interval
        failed_probes = 0
        while True:
            cmd = await self._next_command(min(TICK, model.health.interval))
            if cmd is not None:
                if cmd.kind == "hang":
                    return Failure(cmd.cause, cmd.detail)
                if cmd.kind in ("stop", "drain", "exit", "restart"):
                    return cmd
                self._finish(cmd)
            condition = self.child.condition()
            if condition == "exited":
                return Failure("crash", f"exited with code {self.child.returncode}"
                               + self._log_hint())
            if condition is not None:
                return Failure("process", f"process is {condition}")
            now = self.clock.now()
            if now >= next_health:
                next_health = now + model.health.interval
                if (await self.prober.health(health_url, model.health.timeout)
                        and await self._still_resident()):
                    failed_probes = 0
                    if self.state is State.UNHEALTHY:
                        self._move(State.READY, None)
                else:
                    failed_probes += 1
                    if failed_probes >= model.health.failures:
                        return Failure("health", f"{failed_probes} health probes failed")
                    if self.state is State.READY:
                        self._move(State.UNHEALTHY, "health probe failed")
            if self._canary_due():
                ok = await self.prober.canary(self.launch.base_url,
                                              self.backend.upstream_model(model),
                                              model.canary_timeout)
                self.last_activity = self.clock.now()
                if not ok and self.in_flight == 0:
                    return Failure("canary", "one-token canary completion failed")
            if (self.ready_since is not None
                    and self.clock.now() - self.ready_since >= self.server.stable_after):
                self._consecutive = 0

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The daemon's own sd_notify socket is not for the engines.
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        if self.spec.model.engine == "ollama":
            env["LLM_SUPERVISOR_OLLAMA_STORE"] = str(self.server.cache_dir / "ollama-store")
        return env

    def _ollama_hosted(self) -> list[tuple[str, Modelfile, Path]]:
        rows = [(self.spec.model, self.spec.modelfile, self.spec.model_path), *self.spec.hosted]
        return [(m.name, with_num_ctx(mf, m.ctx), path) for m, mf, path in rows]

    async def _make_resident(self, deadline: float) -> Failure | Command | None:
        """Ollama: create every hosted model and preload it with keep_alive -1."""
        assert self.residency is not None and self.launch is not None
        task = asyncio.ensure_future(
            self.residency.ensure_resident(self.launch.base_url, self._ollama_hosted()))
        try:
            while not task.done():
                if self.clock.now() >= deadline:
                    return Failure("boot", "models not resident after "
                                   f"{self.spec.model.load_timeout:g}s" + self._log_hint())
                cmd = await self._next_command(TICK)
                if cmd is not None and cmd.kind in ("stop", "drain", "exit", "restart"):
                    return cmd
                self._finish(cmd)
        finally:
            if not task.done():
                task.cancel()
        exc = task.exception()
        if exc is not None:
            return Failure("boot", f"could not make models resident: {exc}" + self._log_hint())
        return None

    async def _still_resident(self) -> bool:
        """Ollama: reload any hosted model that /api/ps no longer lists (an eviction)."""
        if self.residency is None or self.launch is None:
            return True
        try:
            gone = await self.residency.missing(self.launch.base_url, list(self.spec.models))
            if gone:
                self.evictions += len(gone)
                logger.warning("evicted %s from %s; reloading", ", ".join(gone), self.id)
                for name in gone:
                    self.events.emit("eviction", self.id,
                                     f"ollama unloaded {name}; reloading", model=name)
                await self.residency.ensure_resident(self.launch.base_url,
                                                     self._ollama_hosted())
        except OllamaError as exc:
            logger.warning("residency check failed on %s: %s", self.id, exc)
            return False
        return True

    def _canary_due(self) -> bool:
        interval = self.spec.model.canary_interval
        return (interval > 0 and self.in_flight == 0 and self.state is State.READY
                and self.clock.now() - self.last_activity >= interval)

    def _log_hint(self) -> str:
        lines = tail(self.log_path, 5)
        return ("; last log lines:\n  " + "\n  ".join(lines)) if lines else ""

    async def _fail(self, failure: Failure) -> None:
        """Replace after a failure: stop the child, then BACKOFF or, past the limit, FATAL."""
        kind = "hang" if failure.cause in ("health", "stall", "canary", "process") else "crash"
        if failure.cause == "boot":
            kind = "boot_failure"
        logger.warning("unhealthy %s (%s): %s", self.id, failure.cause, failure.message)
        self.events.emit(kind, self.id, failure.message, cause=failure.cause,
                         model=self.model.name)
        if self.state is not State.STOPPING:
            self._move(State.STOPPING, f"{failure.cause}: {failure.message}")
        # A hung engine cannot drain, and llama-server's graceful SIGTERM waits for the
        # requests the proxy still holds open: kill it at once.
        await self._kill_child(force=failure.cause in HANG_CAUSES)
        now = self.clock.now()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.server.failure_window:
            self._failures.popleft()
        self._consecutive += 1
        self.ready_since = None
        if len(self._failures) >= self.server.max_failures:
            self._move(State.FATAL, f"gave up after {len(self._failures)} failures in "
                       f"{self.server.failure_window:g}s; last: {failure.cause}: "
                       f"{failure.message}")
            logger.error("gave up on %s: %s", self.id, self.reason)
            self.events.emit("fatal", self.id, self.reason or "", cause=failure.cause,
                             model=self.model.name)
        else:
            self._move(State.BACKOFF, f"{failure.cause}: {failure.message}")
            self.events.emit("restart", self.id,
                             f"restarting in {self._backoff_delay():g}s",
                             cause=failure.cause, model=self.model.name)

    def _backoff_delay(self) -> float:
        n = max(1, self._consecutive)
        return float(min(self.server.backoff_max, self.server.backoff_initial * 2 ** (n - 1)))

    async def _kill_child(self, force: bool = False) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        if force:
            child.signal_group(signal.SIGCONT)
            child.signal_group(signal.SIGKILL)
            code = await child.wait()
        else:
            code = await terminate(child, self.spec.model.stop_grace)
        logger.info("stopped %s pid %d (exit %s)", self.id, child.pid, code)
