"""The replica state machine, driven by a fake clock, process runner and prober."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.backends.llama_server import LlamaServer
from supervisor.config import HealthConfig, ModelConfig, ServerConfig
from supervisor.events import Events
from supervisor.modelfile import parse_modelfile
from supervisor.replica import Replica, ReplicaSpec
from supervisor.states import State, TransitionError, check_transition


class FakeClock:
    """Virtual time: sleeping advances it at once."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


class FakeChild:
    def __init__(self, pid: int, ignore_term: bool = False) -> None:
        self.pid = pid
        self.ignore_term = ignore_term
        self._code: int | None = None
        self._exited = asyncio.Event()
        self.signals: list[int] = []
        self.stopped = False

    @property
    def returncode(self) -> int | None:
        return self._code

    def exit(self, code: int) -> None:
        if self._code is None:
            self._code = code
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._code is not None
        return self._code

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignore_term):
            self.exit(-sig)

    def condition(self) -> str | None:
        if self._code is not None:
            return "exited"
        return "stopped" if self.stopped else None


class FakeRunner:
    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.argvs: list[Sequence[str]] = []
        self.ignore_term = False
        self.fail_spawn = False
        self.exit_at_once: int | None = None

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                    cpu_set: tuple[int, ...]) -> FakeChild:
        if self.fail_spawn:
            raise FileNotFoundError(argv[0])
        self.argvs.append(argv)
        child = FakeChild(100 + len(self.children), self.ignore_term)
        if self.exit_at_once is not None:
            child.exit(self.exit_at_once)
        self.children.append(child)
        return child


class FakeProber:
    def __init__(self) -> None:
        self.healthy: Callable[[], bool] = lambda: True
        self.canary_ok: Callable[[], bool] = lambda: True
        self.alive: Callable[[], bool] = lambda: True
        self.health_calls = 0
        self.canary_calls = 0
        self.progress_urls: list[str] = []

    async def health(self, url: str, timeout: float) -> bool:
        self.health_calls += 1
        return self.healthy()

    async def canary(self, base_url: str, model: str, timeout: float) -> bool:
        self.canary_calls += 1
        return self.canary_ok()

    async def answers(self, url: str, timeout: float) -> bool:
        self.progress_urls.append(url)
        return self.alive()


def make(tmp_path: Path, **model_kw: object) -> tuple[Replica, FakeRunner, FakeProber,
                                                        FakeClock, list[State]]:
    mf_path = tmp_path / "m.Modelfile"
    mf_path.write_text("FROM ./m.gguf\n")
    defaults: dict[str, object] = {
        "warmup": False, "canary_interval": 0.0, "stop_grace": 0.05, "load_timeout": 5.0,
        "health": HealthConfig(interval=1.0, timeout=1.0, failures=2),
        "command": ("/bin/llama-server",),
    }
    defaults.update(model_kw)
    model = replace(ModelConfig(name="m", modelfile=mf_path), **defaults)  # type: ignore[arg-type]
    server = ServerConfig(state_dir=tmp_path / "state", log_dir=tmp_path / "logs",
                          cache_dir=tmp_path / "cache", max_failures=3, failure_window=300.0,
                          backoff_initial=1.0, backoff_max=4.0, stable_after=60.0,
                          drain_timeout=5.0)
    spec = ReplicaSpec(id="m/0", model=model, modelfile=parse_modelfile("FROM ./m.gguf\n"),
                       model_path=tmp_path / "m.gguf", cpu_set=(0,), threads=1)
    runner, prober, clock = FakeRunner(), FakeProber(), FakeClock()
    replica = Replica(spec, LlamaServer(), runner, prober, server, Events(), clock=clock,
                      port_alloc=lambda: 40000)
    seen: list[State] = []
    replica.listeners.append(lambda r: seen.append(r.state))
    return replica, runner, prober, clock, seen


async def until(pred: Callable[[], bool], steps: int = 5000) -> None:
    for _ in range(steps):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def finish(replica: Replica, task: asyncio.Task[None]) -> None:
    replica.send("exit")
    await asyncio.wait_for(task, 5)


def test_transition_table_rejects_illegal_moves() -> None:
    check_transition(State.STOPPED, State.STARTING)
    check_transition(State.STOPPING, State.FATAL)
    with pytest.raises(TransitionError, match="READY -> STARTING"):
        check_transition(State.READY, State.STARTING)
    with pytest.raises(TransitionError):
        check_transition(State.STOPPED, State.READY)


async def test_boots_to_ready_after_health_turns_200(tmp_path: Path) -> None:
    replica, runner, prober, _clock, seen = make(tmp_path)
    answers = iter([False, False, True])
    prober.healthy = lambda: next(answers, True)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    assert seen[:2] == [State.STARTING, State.READY]
    assert prober.health_calls >= 3
    argv = list(runner.argvs[0])
    assert argv[:5] == ["/bin/llama-server", "--host", "127.0.0.1", "--port", "40000"]
    assert argv[argv.index("--parallel") + 1] == "2"
    assert argv[argv.index("--threads") + 1] == "1"
    await finish(replica, task)
    assert runner.children[0].signals[0] == signal.SIGTERM
    assert replica.state is State.STOPPED


async def test_warmup_failure_is_a_boot_failure(tmp_path: Path) -> None:
    replica, _runner, prober, _clock, seen = make(tmp_path, warmup=True)
    prober.canary_ok = lambda: False
    task = asyncio.create_task(replica.run())
    await until(lambda: State.BACKOFF in seen)
    assert State.READY not in seen
    assert replica.reason is not None and "warm-up" in replica.reason
    await finish(replica, task)


async def test_never_ready_is_a_boot_failure_then_backoff_then_fatal(tmp_path: Path) -> None:
    replica, runner, prober, _clock, seen = make(tmp_path, load_timeout=2.0)
    prober.healthy = lambda: False
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.FATAL, steps=50000)
    # three boots (max_failures=3), each STARTING -> STOPPING, never READY
    assert seen.count(State.STARTING) == 3
    assert State.READY not in seen
    assert seen[-1] is State.FATAL
    assert "gave up after 3 failures" in (replica.reason or "")
    assert "not ready after 2s" in (replica.reason or "")
    assert len(runner.children) == 3
    # FATAL stays FATAL: no more spawns on its own
    for _ in range(200):
        await asyncio.sleep(0)
    assert len(runner.children) == 3
    # an explicit restart tries again
    prober.healthy = lambda: True
    replica.send("restart")
    await until(lambda: replica.state is State.READY)
    assert len(runner.children) == 4
    await finish(replica, task)


async def test_child_exiting_during_boot_reports_exit_code(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, _seen = make(tmp_path)
    runner.exit_at_once = 3
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.BACKOFF)
    assert "exited with code 3 before ready" in (replica.reason or "")
    await finish(replica, task)


async def test_spawn_error_is_a_boot_failure(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, _seen = make(tmp_path)
    runner.fail_spawn = True
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.BACKOFF)
    assert "could not start /bin/llama-server" in (replica.reason or "")
    await finish(replica, task)


async def test_crash_while_ready_restarts_with_backoff(tmp_path: Path) -> None:
    replica, runner, _prober, clock, seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    runner.children[0].exit(139)
    await until(lambda: replica.state is State.BACKOFF)
    assert "crash: exited with code 139" in (replica.reason or "")
    t_backoff = clock.now()
    await until(lambda: replica.state is State.READY and len(runner.children) == 2)
    assert clock.now() - t_backoff >= 1.0  # backoff_initial
    assert replica.restarts == 1
    assert seen == [State.STARTING, State.READY, State.STOPPING, State.BACKOFF,
                    State.STARTING, State.READY]
    await finish(replica, task)


async def test_stopped_process_is_a_hang(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, _seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    runner.children[0].stopped = True  # SIGSTOP: psutil says 'stopped'
    await until(lambda: replica.state is State.BACKOFF)
    assert replica.reason == "process: process is stopped"
    # a hung engine is not asked nicely: SIGCONT (so it can die) and SIGKILL at once
    assert runner.children[0].signals == [signal.SIGCONT, signal.SIGKILL]
    kinds = [e.kind for e in replica.events.latest()]
    assert "hang" in kinds
    await finish(replica, task)


async def test_one_failed_probe_is_unhealthy_and_recovers(tmp_path: Path) -> None:
    replica, _runner, prober, _clock, seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    answers = iter([False, True])
    prober.healthy = lambda: next(answers, True)
    await until(lambda: State.UNHEALTHY in seen and replica.state is State.READY)
    assert seen[-2:] == [State.UNHEALTHY, State.READY]
    assert not replica.accepts() or replica.state is State.READY
    await finish(replica, task)


async def test_consecutive_failed_probes_mark_hung(tmp_path: Path) -> None:
    replica, runner, prober, _clock, _seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    prober.healthy = lambda: False
    await until(lambda: replica.state is State.BACKOFF)
    assert replica.reason == "health: 2 health probes failed"
    assert runner.children[0].returncode is not None
    await finish(replica, task)


async def test_failed_canary_on_idle_replica_marks_hung(tmp_path: Path) -> None:
    replica, _runner, prober, _clock, _seen = make(tmp_path, canary_interval=5.0)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    await until(lambda: prober.canary_calls >= 1)
    prober.canary_ok = lambda: False
    await until(lambda: replica.state is State.BACKOFF)
    assert (replica.reason or "").startswith("canary:")
    await finish(replica, task)


async def test_canary_waits_for_idle(tmp_path: Path) -> None:
    replica, _runner, prober, _clock, _seen = make(tmp_path, canary_interval=5.0)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    replica.in_flight = 1
    for _ in range(500):
        await asyncio.sleep(0)
    assert prober.canary_calls == 0
    replica.in_flight = 0
    await until(lambda: prober.canary_calls >= 1)
    await finish(replica, task)


async def test_reported_stall_replaces_the_process(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, _seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    replica.report_hang("stall", "no byte for 20s")
    await until(lambda: replica.state is State.READY and len(runner.children) == 2)
    assert replica.restarts == 1
    assert any(e.kind == "hang" and e.cause == "stall" for e in replica.events.latest())
    await finish(replica, task)


async def test_busy_replica_whose_generation_loop_is_silent_is_hung(tmp_path: Path) -> None:
    replica, runner, prober, _clock, _seen = make(tmp_path, stall_timeout=3.0)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    for _ in range(300):  # idle: /slots is never asked
        await asyncio.sleep(0)
    assert prober.progress_urls == []
    replica.in_flight = 1
    await until(lambda: len(prober.progress_urls) >= 2)
    assert replica.state is State.READY  # answering: still READY
    assert prober.progress_urls[0] == "http://127.0.0.1:40000/slots"
    prober.alive = lambda: False
    await until(lambda: replica.state is State.BACKOFF)
    assert replica.reason == "stall: busy, and the generation loop did not answer /slots in 6s"
    replica.in_flight = 0
    await until(lambda: replica.state is State.READY and len(runner.children) == 2)
    await finish(replica, task)


async def test_silent_loop_after_the_work_finished_is_not_a_hang(tmp_path: Path) -> None:
    replica, _runner, prober, _clock, _seen = make(tmp_path)

    def went_idle() -> bool:  # the last request finished while /slots was being asked
        replica.in_flight = 0
        return False

    prober.alive = went_idle
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    replica.in_flight = 1
    await until(lambda: len(prober.progress_urls) >= 1)
    for _ in range(300):
        await asyncio.sleep(0)
    assert replica.state is State.READY and replica.restarts == 0
    await finish(replica, task)


async def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, _seen = make(tmp_path)
    runner.ignore_term = True
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    await finish(replica, task)
    assert runner.children[0].signals == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]


async def test_drain_waits_for_in_flight_then_stops(tmp_path: Path) -> None:
    replica, runner, _prober, _clock, seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    replica.in_flight = 1
    done = replica.send("drain")
    await until(lambda: replica.draining)
    assert not replica.accepts()
    assert runner.children[0].returncode is None  # still serving the in-flight request
    replica.in_flight = 0
    await asyncio.wait_for(done, 5)
    assert replica.state is State.STOPPED
    assert seen[-2:] == [State.STOPPING, State.STOPPED]
    await finish(replica, task)


async def test_backoff_doubles_and_caps(tmp_path: Path) -> None:
    replica, _runner, _prober, _clock, _seen = make(tmp_path)
    delays = []
    for n in range(1, 6):
        replica._consecutive = n
        delays.append(replica._backoff_delay())
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]


async def test_stable_period_resets_backoff(tmp_path: Path) -> None:
    replica, runner, _prober, clock, _seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    runner.children[0].exit(1)
    await until(lambda: replica.state is State.READY and len(runner.children) == 2)
    assert replica._consecutive == 1
    start = clock.now()
    await until(lambda: clock.now() - start > 61 and replica._consecutive == 0, steps=100000)
    await finish(replica, task)


async def test_stop_during_boot(tmp_path: Path) -> None:
    replica, runner, prober, _clock, seen = make(tmp_path)
    prober.healthy = lambda: False
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.STARTING)
    await asyncio.wait_for(replica.send("stop"), 5)
    assert replica.state is State.STOPPED
    assert seen == [State.STARTING, State.STOPPING, State.STOPPED]
    assert runner.children[0].returncode is not None
    await finish(replica, task)


async def test_snapshot_shape(tmp_path: Path) -> None:
    replica, _runner, _prober, _clock, _seen = make(tmp_path)
    task = asyncio.create_task(replica.run())
    await until(lambda: replica.state is State.READY)
    snap = replica.snapshot()
    assert snap["id"] == "m/0" and snap["state"] == "READY" and snap["pid"] == 100
    assert snap["port"] == 40000 and snap["cpus"] == [0] and snap["slots"] == 2
    await finish(replica, task)


def test_log_tail_folds_repeated_lines(tmp_path: Path) -> None:
    from supervisor.process import tail

    log = tmp_path / "x.log"
    log.write_text("start\n" + "GET /health 503\n" * 40 + "bye\n")
    assert tail(log, 3) == ["start", "GET /health 503 (x40)", "bye"]
    assert tail(tmp_path / "missing.log") == []
