"""Child processes: spawn in their own group, watch with psutil, kill in two steps."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _child_setup(cpu_set: tuple[int, ...]) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the parent, pin the cores."""

    def setup() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpu_set:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpu_set)

    return setup


class Child(Protocol):
    """What the replica needs of a running child."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None: ...

    def condition(self) -> str | None:
        """None while running normally, else why not: 'exited', 'zombie', 'stopped'."""
        ...


class Runner(Protocol):
    """Starts children; injected so the state machine can be tested without processes."""

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
        cpu_set: tuple[int, ...],
    ) -> Child: ...


class OsChild:
    """A real child process in its own process group."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        try:
            self._ps: psutil.Process | None = psutil.Process(proc.pid)
        except psutil.Error:
            self._ps = None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def condition(self) -> str | None:
        if self._proc.returncode is not None:
            return "exited"
        if self._ps is None:
            return "exited"
        try:
            status = self._ps.status()
        except psutil.NoSuchProcess:
            return "exited"
        except psutil.Error:
            return None
        if status == psutil.STATUS_ZOMBIE:
            return "zombie"
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return "stopped"
        if status == psutil.STATUS_DEAD:
            return "exited"
        return None


class OsRunner:
    """Spawns real children and records their pids so a restarted daemon can reap them."""

    def __init__(self, registry: PidRegistry | None = None) -> None:
        self.registry = registry

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
        cpu_set: tuple[int, ...],
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # noqa: ASYNC230 (a local append-open is instant)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} spawning: {shlex.join(argv)}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(cpu_set),
            )
        child = OsChild(proc)
        if self.registry is not None:
            self.registry.add(child.pid)
            asyncio.get_running_loop().create_task(self._forget_on_exit(child))
        return child

    async def _forget_on_exit(self, child: OsChild) -> None:
        await child.wait()
        if self.registry is not None:
            self.registry.remove(child.pid)


async def terminate(child: Child, grace: float) -> int:
    """SIGTERM to the group (and SIGCONT, for a stopped one), wait `grace`, then SIGKILL."""
    if child.returncode is not None:
        return child.returncode
    child.signal_group(signal.SIGTERM)
    child.signal_group(signal.SIGCONT)
    try:
        return await asyncio.wait_for(child.wait(), grace)
    except TimeoutError:
        logger.warning("killed pid %d: no exit %.1fs after SIGTERM", child.pid, grace)
        child.signal_group(signal.SIGKILL)
        return await child.wait()


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a child's log, with runs of one repeated line folded into one."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return []
    raw_lines = data.splitlines()
    if size > len(data):
        raw_lines = raw_lines[1:]  # the first line was cut by the seek
    texts: list[str] = []
    counts: list[int] = []
    for raw in raw_lines:
        line = raw.decode("utf-8", "replace")
        if texts and texts[-1] == line:
            counts[-1] += 1
        else:
            texts.append(line)
            counts.append(1)
    folded = [f"{t} (x{n})" if n > 1 else t for t, n in zip(texts, counts, strict=True)]
    return folded[-lines:]


class PidRegistry:
    """Child pids (with their start times) in the state dir, to reap after a hard crash."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pids: dict[int, float] = {}

    def add(self, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._pids[pid] = created
        self._save()

    def remove(self, pid: int) -> None:
        if self._pids.pop(pid, None) is not None:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(p): t for p, t in self._pids.items()}))
        os.replace(tmp, self.path)

    def reap_leftovers(self) -> list[int]:
        """Kill every recorded child that still runs (same pid and start time)."""
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        killed = []
        for pid_s, created in recorded.items():
            pid = int(pid_s)
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - float(created)) > 1.0:
                    continue
            except psutil.Error:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                proc.kill()
            logger.warning("reaped leftover child pid %d from a previous run", pid)
            killed.append(pid)
        self._pids.clear()
        self._save()
        return killed
