"""A model's replicas, its bounded request queue, and the leases that count load."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .balancer import Candidate, choose, defer_for_affine
from .config import ModelConfig
from .replica import Replica
from .states import State

AFFINITY_ENTRIES = 4096


class QueueFull(Exception):
    """Every slot is busy and the queue is at max_queue (429)."""


class QueueTimeout(Exception):
    """Waited queue_timeout for a slot (503)."""


class NoReplica(Exception):
    """No replica of the model can serve now or soon (503)."""


@dataclass
class Lease:
    """One request's hold on one slot of one replica; release exactly once."""

    pool: ModelPool
    replica: Replica
    waited_s: float
    keys: list[str]
    _released: bool = False

    def release(self, served: bool = True) -> None:
        if self._released:
            return
        self._released = True
        self.replica.in_flight -= 1
        self.replica.last_activity = self.replica.clock.now()
        if served:
            self.replica.served += 1
            self.pool.remember(self.keys, self.replica.id)
        self.pool.dispatch()


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    keys: list[str] = field(compare=False)
    exclude: frozenset[str] = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)
    since: float = field(compare=False)


class ModelPool:
    """Routes a model's requests: least-loaded READY replica, else a bounded FIFO."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.replicas: list[Replica] = []
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._turn = itertools.count()
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self.requests = 0
        self.errors = 0
        self.rejected = 0
        self.tokens = {"prompt": 0, "completion": 0, "cached": 0}
        self.last_wait_s = 0.0

    # ---- affinity ------------------------------------------------------------------

    def remember(self, keys: list[str], replica_id: str) -> None:
        for key in keys:
            self._affinity[key] = replica_id
            self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def _affine(self, keys: list[str]) -> str | None:
        if not self.model.affinity:
            return None
        for key in reversed(keys):
            rid = self._affinity.get(key)
            if rid is not None:
                return rid
        return None

    # ---- choosing --------------------------------------------------------------------

    def _pick(self, keys: list[str], exclude: frozenset[str]) -> Replica | None:
        ready = [r for r in self.replicas if r.accepts()]
        snapshot = [Candidate(r.id, r.in_flight, r.slots) for r in ready]
        rid = choose(snapshot, self._affine(keys), self.model.affinity_margin, exclude,
                     next(self._turn))
        if rid is None:
            return None
        return next(r for r in ready if r.id == rid)

    def _lease(self, replica: Replica, keys: list[str], since: float) -> Lease:
        replica.in_flight += 1
        replica.last_activity = replica.clock.now()
        waited = time.monotonic() - since
        self.last_wait_s = waited
        return Lease(self, replica, waited, keys)

    def can_serve_soon(self, exclude: frozenset[str] = frozenset()) -> bool:
        """Some replica is READY or on its way there (not FATAL, not stopped for good)."""
        live = (State.READY, State.UNHEALTHY, State.STARTING, State.BACKOFF)
        return any(r.state in live and not r.draining and r.id not in exclude
                   for r in self.replicas)

    async def acquire(self, keys: list[str], priority: int = 1,
                      exclude: frozenset[str] = frozenset()) -> Lease:
        """A slot on the best replica, waiting in the queue when all are busy."""
        since = time.monotonic()
        if not self._waiters:
            replica = self._pick(keys, exclude)
            if replica is not None:
                return self._lease(replica, keys, since)
        if not self.can_serve_soon(exclude):
            raise NoReplica(self.model.name)
        if len(self._waiters) >= self.model.max_queue:
            self.rejected += 1
            raise QueueFull(self.model.name)
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(priority, next(self._seq), keys, exclude, future, since)
        self._waiters.append(waiter)
        self._waiters.sort()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.model.queue_timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()
            future.cancel()
            raise QueueTimeout(self.model.name) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.result().release(served=False)
            future.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def dispatch(self) -> None:
        """Hand free slots to waiters in priority-then-arrival order, prefix holders first.

        A waiter whose affine replica is READY but full lets later waiters take a slot
        elsewhere and waits for its own replica; it still takes any slot left over, so no
        slot idles while someone waits.
        """
        deferred: list[_Waiter] = []
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            snapshot = [Candidate(r.id, r.in_flight, r.slots)
                        for r in self.replicas if r.accepts()]
            if defer_for_affine(snapshot, self._affine(waiter.keys), waiter.exclude):
                deferred.append(waiter)
                continue
            self._hand_slot(waiter)
        for waiter in deferred:
            self._hand_slot(waiter)

    def _hand_slot(self, waiter: _Waiter) -> None:
        replica = self._pick(waiter.keys, waiter.exclude)
        if replica is None:
            if not self.can_serve_soon(waiter.exclude):
                self._waiters.remove(waiter)
                waiter.future.set_exception(NoReplica(self.model.name))
            # A waiter that excluded the only free replica must not block the rest.
            return
        self._waiters.remove(waiter)
        waiter.future.set_result(self._lease(replica, waiter.keys, waiter.since))

    # ---- reporting ---------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.model.name,
            "engine": self.model.engine,
            "replicas": len(self.replicas),
            "ready": sum(1 for r in self.replicas if r.accepts()),
            "queue_depth": self.queue_depth,
            "queue_max": self.model.max_queue,
            "queue_wait_last_s": round(self.last_wait_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.rejected,
            "tokens": dict(self.tokens),
        }
