"""The running daemon: replicas and pools built from a config and a plan; reload by diff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .backends import backend_for
from .backends.llama_server import warm_header_cache
from .cache import resolve_model_source
from .config import Config, pins_cpus
from .estimate import Estimate, estimate_gguf
from .events import Events
from .gpus import Inventory, gpu_stats
from .modelfile import Modelfile, load_modelfile
from .ollama_residency import OllamaResidency
from .placement import Plan, ReplicaPlan, format_plan, place
from .pool import ModelPool
from .probes import Prober
from .process import Runner
from .replica import Replica, ReplicaSpec
from .states import State

logger = logging.getLogger(__name__)


class PlanError(Exception):
    """The configured models do not fit the host; carries the plan table."""


@dataclass(frozen=True)
class Prepared:
    """A config with everything read and checked: Modelfiles, model files, estimates, plan."""

    config: Config
    modelfiles: dict[str, Modelfile]
    paths: dict[str, Path]
    estimates: dict[str, Estimate]
    plan: Plan
    inventory: Inventory

    def fingerprint(self, name: str) -> tuple[object, ...]:
        """What, if changed, means a model's replicas must be replaced."""
        return (self.config.model(name), self.modelfiles[name], self.paths[name])


def _read_models(config: Config, progress: bool
                 ) -> tuple[dict[str, Modelfile], dict[str, Path], dict[str, Estimate]]:
    """Read every Modelfile, fetch every model into the cache, and estimate its memory."""
    modelfiles: dict[str, Modelfile] = {}
    paths: dict[str, Path] = {}
    estimates: dict[str, Estimate] = {}
    server = config.server
    for model in config.models:
        mf = load_modelfile(model.modelfile)
        modelfiles[model.name] = mf
        path = resolve_model_source(
            mf.from_, base_dir=model.modelfile.parent, cache_dir=server.cache_dir,
            hf_endpoint=server.hf_endpoint, hf_token=server.hf_token,
            ollama_models=server.ollama_models, progress=progress)
        paths[model.name] = path
        # Read the header here, in prepare's thread, so a spawn never parses it in the loop.
        warm_header_cache(path)
        ctx = model.ctx or int(mf.param("num_ctx", 2048) or 2048)
        estimates[model.name] = estimate_gguf(path, ctx, model.slots)
    return modelfiles, paths, estimates


def prepare_plan(config: Config, inventory: Inventory) -> Plan:
    """The placement plan for a config, whether it fits or not (blocking)."""
    _, _, estimates = _read_models(config, progress=True)
    return place(inventory, [(m, estimates[m.name]) for m in config.models])


def prepare(config: Config, inventory: Inventory, *, progress: bool = False) -> Prepared:
    """Everything a config needs before anything starts; PlanError if it does not fit."""
    modelfiles, paths, estimates = _read_models(config, progress)
    plan = place(inventory, [(m, estimates[m.name]) for m in config.models])
    if not plan.fits:
        raise PlanError(format_plan(plan, inventory))
    return Prepared(config, modelfiles, paths, estimates, plan, inventory)


class Supervisor:
    """Owns every replica task and every model pool."""

    def __init__(self, prepared: Prepared, runner: Runner, prober: Prober,
                 events: Events | None = None,
                 residency: OllamaResidency | None = None) -> None:
        self.prepared = prepared
        self.runner = runner
        self.prober = prober
        self.events = events or Events()
        self.residency = residency
        self.pools: dict[str, ModelPool] = {}
        self.replicas: dict[str, Replica] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next_index: dict[str, int] = {}
        self.started_at = time.monotonic()
        self.loaded_at = time.time()
        self.reload_error: str | None = None
        self.draining = False
        # Client connection counts from the listener (an edge module), set once it listens.
        self.connection_stats: Callable[[], dict[str, int]] | None = None
        self.on_change: list[Callable[[], None]] = []
        self._reload_lock = asyncio.Lock()

    @property
    def config(self) -> Config:
        return self.prepared.config

    # ---- building --------------------------------------------------------------------

    def _spec(self, prepared: Prepared, rp: ReplicaPlan, rid: str,
              hosted: list[ReplicaPlan]) -> ReplicaSpec:
        model = prepared.config.model(rp.model)
        others = tuple((prepared.config.model(h.model), prepared.modelfiles[h.model],
                        prepared.paths[h.model]) for h in hosted)
        return ReplicaSpec(
            id=rid, model=model, modelfile=prepared.modelfiles[model.name],
            model_path=prepared.paths[model.name], gpu_indexes=rp.gpu_indexes,
            gpu_uuids=rp.gpu_uuids, tensor_split=rp.tensor_split,
            cpu_set=rp.cpu_set if pins_cpus(prepared.config.server,
                                             len(prepared.inventory.cpus)) else (),
            threads=rp.threads, hosted=others)

    def _new_replica(self, prepared: Prepared, rp: ReplicaPlan,
                     hosted: list[ReplicaPlan] | None = None) -> Replica:
        """Create and start one replica; Ollama ones host every model in `hosted` too."""
        key = "ollama" if hosted is not None else rp.model
        index = self._next_index.get(key, 0)
        self._next_index[key] = index + 1
        spec = self._spec(prepared, rp, f"{key}/{index}", hosted or [])
        replica = Replica(spec, backend_for(spec.model.engine), self.runner, self.prober,
                          prepared.config.server, self.events, residency=self.residency)
        pools = [self.pools[name] for name in spec.models]
        for pool in pools:
            pool.replicas.append(replica)

        def on_change(_replica: Replica) -> None:
            for pool in pools:
                pool.dispatch()
            self._changed()

        replica.listeners.append(on_change)
        self.replicas[replica.id] = replica
        self._tasks[replica.id] = asyncio.get_running_loop().create_task(
            replica.run(), name=f"replica {replica.id}")
        return replica

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    @staticmethod
    def _is_ollama(prepared: Prepared, name: str) -> bool:
        return prepared.config.model(name).engine == "ollama"

    def _plans_for(self, prepared: Prepared, name: str) -> list[ReplicaPlan]:
        return [rp for rp in prepared.plan.replicas if rp.model == name]

    @staticmethod
    def _ollama_groups(prepared: Prepared) -> list[list[ReplicaPlan]]:
        """One `ollama serve` per GPU set (per core set on a CPU-only host)."""
        groups: dict[tuple[object, ...], list[ReplicaPlan]] = {}
        for rp in prepared.plan.replicas:
            if prepared.config.model(rp.model).engine != "ollama":
                continue
            key: tuple[object, ...] = rp.gpu_uuids or ("cpu", rp.index)
            group = groups.setdefault(key, [])
            if all(g.model != rp.model for g in group):
                group.append(rp)
        return list(groups.values())

    def _start_ollama(self, prepared: Prepared) -> list[Replica]:
        return [self._new_replica(prepared, group[0], group[1:])
                for group in self._ollama_groups(prepared)]

    async def start(self) -> None:
        """Start every replica of every model; returns at once (READY comes later)."""
        for model in self.config.models:
            self.pools[model.name] = ModelPool(model)
        for model in self.config.models:
            if model.engine == "ollama":
                continue
            for rp in self._plans_for(self.prepared, model.name):
                self._new_replica(self.prepared, rp)
        self._start_ollama(self.prepared)

    # ---- queries ---------------------------------------------------------------------

    def ready(self) -> bool:
        """Every model has a READY replica."""
        return bool(self.pools) and all(
            any(r.accepts() for r in pool.replicas) for pool in self.pools.values())

    def summary(self) -> str:
        ready = sum(1 for r in self.replicas.values() if r.accepts())
        return (f"{ready}/{len(self.replicas)} replicas ready, "
                f"{len(self.pools)} models, "
                f"{sum(p.queue_depth for p in self.pools.values())} queued")

    def status(self) -> dict[str, object]:
        inv = self.prepared.inventory
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "ready": self.ready(),
            "draining": self.draining,
            "config": {"source": str(self.config.source) if self.config.source else None,
                       "loaded_at": self.loaded_at, "reload_error": self.reload_error},
            "gpus": gpu_stats() if inv.gpus and not inv.simulated else [],
            "cpus": len(inv.cpus),
            "connections": self.connection_stats() if self.connection_stats else None,
            "models": [pool.snapshot() for pool in self.pools.values()],
            "replicas": [r.snapshot() for r in self.replicas.values()],
            "events": [e.to_json() for e in self.events.latest(50)],
        }

    # ---- commands ---------------------------------------------------------------------

    async def _retire(self, replica: Replica, drain: bool = True) -> None:
        """Drain (optionally), stop and forget one replica."""
        if drain:
            await replica.send("drain")
        await replica.send("exit")
        task = self._tasks.pop(replica.id, None)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.replicas.pop(replica.id, None)
        for name in replica.spec.models:
            pool = self.pools.get(name)
            if pool is not None and replica in pool.replicas:
                pool.replicas.remove(replica)
                pool.dispatch()
        self._changed()

    async def reload(self, new: Prepared) -> dict[str, list[str]]:
        """Apply a prepared config: add, remove, and roll changed models replica by replica."""
        async with self._reload_lock:
            old = self.prepared
            old_names = {m.name for m in old.config.models}
            new_names = {m.name for m in new.config.models}
            added = sorted(new_names - old_names)
            removed = sorted(old_names - new_names)
            changed = sorted(n for n in old_names & new_names
                             if old.fingerprint(n) != new.fingerprint(n))
            self.prepared = new
            for name in added:
                self.pools[name] = ModelPool(new.config.model(name))
            for name in old_names & new_names:
                self.pools[name].model = new.config.model(name)
            for name in added:
                if not self._is_ollama(new, name):
                    for rp in self._plans_for(new, name):
                        self._new_replica(new, rp)
            for name in changed:
                if not (self._is_ollama(old, name) or self._is_ollama(new, name)):
                    await self._roll(name, new)
            ollama_touched = any(
                self._is_ollama(p, n) for p, names in ((new, added), (old, removed),
                                                       (new, changed), (old, changed))
                for n in names)
            if ollama_touched:
                await self._roll_ollama(new)
            for name in removed:
                pool = self.pools[name]
                await asyncio.gather(*(self._retire(r) for r in list(pool.replicas)))
                del self.pools[name]
            self.loaded_at = time.time()
            self.reload_error = None
            diff = {"added": added, "removed": removed, "changed": changed}
            self.events.emit("reload", None, f"reloaded: {diff}")
            logger.info("reloaded: added %s, removed %s, changed %s", added, removed, changed)
            return diff

    async def _roll_ollama(self, new: Prepared) -> None:
        """Replace the shared Ollama processes: start the new set, wait READY, drain the old."""
        old = [r for r in self.replicas.values() if r.spec.model.engine == "ollama"]
        fresh = self._start_ollama(new)
        for replica in fresh:
            await self._await_ready(replica, replica.spec.model.load_timeout)
        await asyncio.gather(*(self._retire(r) for r in old))

    async def _await_ready(self, fresh: Replica, load_timeout: float) -> None:
        try:
            await fresh.wait_state(State.READY, State.FATAL, timeout=load_timeout * 2 + 30)
        except TimeoutError:
            pass
        if fresh.state is not State.READY:
            reason = fresh.reason
            await self._retire(fresh, drain=False)
            raise RuntimeError(f"{fresh.id} did not become ready: {reason}")

    async def _roll(self, name: str, new: Prepared) -> None:
        """Replace a model's replicas one at a time: start new, wait READY, drain old."""
        pool = self.pools[name]
        old_replicas = list(pool.replicas)
        plans = self._plans_for(new, name)
        model = new.config.model(name)
        for i, rp in enumerate(plans):
            fresh = self._new_replica(new, rp)
            await self._await_ready(fresh, model.load_timeout)
            if i < len(old_replicas):
                await self._retire(old_replicas[i])
        for leftover in old_replicas[len(plans):]:
            await self._retire(leftover)

    async def shutdown(self, drain_timeout: float) -> None:
        """Let in-flight requests finish (up to drain_timeout), then stop every child."""
        self.draining = True
        deadline = time.monotonic() + drain_timeout
        while (any(r.in_flight for r in self.replicas.values())
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        for replica in list(self.replicas.values()):
            replica.send("exit")
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        logger.info("stopped every replica")

