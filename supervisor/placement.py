"""Where every replica runs: a pure function of the inventory and the models' estimates.

Rules (DESIGN.md, "Placement and residency"):

- Every replica of every model is placed at once and stays; nothing is evicted. What
  does not fit makes ``Plan.fits`` False and is listed in ``Plan.problems``.
- Models are placed largest first. A replica that fits on one GPU gets one GPU: one not
  yet holding a replica of the same model when possible, else the GPU with the most free
  memory left (spread). If that leaves something unplaced, the whole plan is tried again
  choosing the GPU with the least memory left that still holds it (pack), and the packed
  plan is used when it fits.
- A replica that fits on no single GPU gets the smallest set of GPUs that holds it,
  preferring sets whose GPUs are all NVLink peers, with ``tensor_split`` proportional to
  the GPUs' free memory. Each GPU beyond the first costs ``Estimate.per_extra_gpu`` more
  (its own compute buffer and CUDA context); ``need_bytes`` includes it.
- ``replicas: per-gpu`` puts replica i on the i-th allowed GPU, and means one replica on
  a CPU-only host. ``ModelConfig.gpus`` restricts a model to those GPU indexes.
- CPUs are split evenly into disjoint contiguous sets, one per replica (GPU or CPU host
  alike); ``threads`` is the set's size. With more replicas than CPUs the sets are single
  CPUs shared round-robin, which is noted, not a problem.
- Ollama models are planned the same way; the runtime groups the replicas on one GPU into
  one ``ollama serve``.

No I/O, no logging, no clock: the same inputs always give the same plan.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from supervisor.estimate import Estimate, format_bytes

if TYPE_CHECKING:  # gpus.py is an adapter (pynvml, psutil); placement only reads its values
    from supervisor.gpus import GPU, Inventory

MAX_SET_SEARCH = 20_000  # GPU subsets examined per set size before falling back to greedy


class PlacedModel(Protocol):
    """What placement reads from a ModelConfig."""

    @property
    def name(self) -> str: ...
    @property
    def replicas(self) -> int | str: ...
    @property
    def gpus(self) -> tuple[int, ...]: ...
    @property
    def engine(self) -> str: ...
    @property
    def slots(self) -> int: ...


@dataclass(frozen=True)
class ReplicaPlan:
    """Where one replica runs and what it was planned to use."""

    model: str
    index: int
    gpu_indexes: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    tensor_split: tuple[float, ...]        # () unless split across GPUs
    cpu_set: tuple[int, ...]
    threads: int
    need_bytes: int                        # the estimate, plus the cost of a split
    gpu_bytes: tuple[int, ...] = ()        # planned bytes on each of gpu_indexes

    @property
    def id(self) -> str:
        """The replica's name, like 'gemma3-270m/0'."""
        return f"{self.model}/{self.index}"


@dataclass(frozen=True)
class Plan:
    """Every replica's placement, whether it all fits, and why not."""

    replicas: tuple[ReplicaPlan, ...]
    fits: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    unplaced: tuple[ReplicaPlan, ...] = ()         # replicas that found no room
    gpu_planned: tuple[tuple[int, int], ...] = ()  # (GPU index, bytes planned on it)

    def for_model(self, name: str) -> tuple[ReplicaPlan, ...]:
        """The placed replicas of one model, in index order."""
        return tuple(r for r in self.replicas if r.model == name)

    def planned_bytes(self, gpu_index: int) -> int:
        """Bytes this plan puts on one GPU."""
        return dict(self.gpu_planned).get(gpu_index, 0)


@dataclass(frozen=True)
class _Slot:
    """A placed (or unplaced) replica before CPU sets are handed out."""

    order: int
    model: str
    index: int
    gpus: tuple[GPU, ...]
    split: tuple[float, ...]
    gpu_bytes: tuple[int, ...]
    need: int


def place(inventory: Inventory, models: Sequence[tuple[PlacedModel, Estimate]]) -> Plan:
    """Place every replica of every model on the inventory; pure."""
    if not inventory.gpus:
        return _place_cpu(inventory, models)
    spread = _place_gpus(inventory, models, pack=False)
    if spread.fits:
        return spread
    packed = _place_gpus(inventory, models, pack=True)
    return packed if packed.fits else spread


def _replica_count(cfg: PlacedModel, n_gpus: int) -> int:
    if cfg.replicas == "per-gpu":
        return max(1, n_gpus)
    return int(cfg.replicas)


def _place_cpu(inventory: Inventory, models: Sequence[tuple[PlacedModel, Estimate]]) -> Plan:
    notes: list[str] = []
    slots: list[_Slot] = []
    for order, (cfg, est) in enumerate(models):
        if cfg.gpus:
            notes.append(f"{cfg.name}: gpus {list(cfg.gpus)} ignored: this host has no GPUs")
        for index in range(_replica_count(cfg, 0)):
            slots.append(_Slot(order, cfg.name, index, (), (), (), est.total))
    replicas, cpu_notes = _with_cpus(slots, inventory.cpus)
    return Plan(
        replicas=replicas, fits=True, problems=(), notes=tuple(notes + cpu_notes)
    )


def _place_gpus(
    inventory: Inventory, models: Sequence[tuple[PlacedModel, Estimate]], *, pack: bool
) -> Plan:
    free = {g.index: g.free_bytes for g in inventory.gpus}
    by_index = {g.index: g for g in inventory.gpus}
    placed: list[_Slot] = []
    unplaced: list[_Slot] = []
    problems: list[tuple[int, int, str]] = []  # (config position, replica, text)
    # Largest first; config order among equals.
    order = sorted(range(len(models)), key=lambda i: -models[i][1].total)
    for pos in order:
        cfg, est = models[pos]
        missing = [i for i in cfg.gpus if i not in by_index]
        if missing:
            problems.append((pos, -1,
                f"{cfg.name}: gpus {missing} not on this host "
                f"(GPUs: {_index_list(tuple(by_index))})"
            ))
        allowed = [g for g in inventory.gpus if not cfg.gpus or g.index in cfg.gpus]
        if not allowed:
            for index in range(_replica_count(cfg, 0)):
                unplaced.append(_Slot(pos, cfg.name, index, (), (), (), est.total))
            continue
        per_gpu = cfg.replicas == "per-gpu"
        hosting: Counter[int] = Counter()
        for index in range(_replica_count(cfg, len(allowed))):
            rid = f"{cfg.name}/{index}"
            if per_gpu:
                gpu = allowed[index]
                if est.total <= free[gpu.index]:
                    slot = _Slot(pos, cfg.name, index, (gpu,), (), (est.total,), est.total)
                else:
                    slot = _Slot(pos, cfg.name, index, (), (), (), est.total)
                    problems.append((pos, index, _short_on_gpu(rid, est.total, gpu, free)))
            else:
                slot = _choose(pos, cfg.name, index, est, allowed, free, hosting, pack)
                if not slot.gpus:
                    problems.append((pos, index, _short_anywhere(rid, est, allowed, free)))
            if slot.gpus:
                for gpu, used in zip(slot.gpus, slot.gpu_bytes, strict=True):
                    free[gpu.index] -= used
                    hosting[gpu.index] += 1
                placed.append(slot)
            else:
                unplaced.append(slot)
    replicas, notes = _with_cpus(placed, inventory.cpus)
    planned = tuple(
        (g.index, g.free_bytes - free[g.index]) for g in inventory.gpus
    )
    return Plan(
        replicas=replicas,
        fits=not problems,
        problems=tuple(text for _, _, text in sorted(problems)),
        notes=tuple(notes),
        unplaced=tuple(_unplaced_plan(s) for s in sorted(unplaced, key=_slot_key)),
        gpu_planned=planned,
    )


def _choose(
    pos: int,
    name: str,
    index: int,
    est: Estimate,
    allowed: list[GPU],
    free: dict[int, int],
    hosting: Counter[int],
    pack: bool,
) -> _Slot:
    """One GPU if any holds the replica, else the smallest set that does."""
    need = est.total
    single = [g for g in allowed if free[g.index] >= need]
    if single:
        gpu = min(single, key=lambda g: (
            hosting[g.index], free[g.index] if pack else -free[g.index], g.index
        ))
        return _Slot(pos, name, index, (gpu,), (), (need,), need)
    for size in range(2, len(allowed) + 1):
        need_k = need + (size - 1) * est.per_extra_gpu
        best: tuple[Any, ...] | None = None
        best_set: tuple[GPU, ...] = ()
        for combo in _subsets(allowed, size, free):
            room = sum(free[g.index] for g in combo)
            if room < need_k:
                continue
            key = (
                not _all_peers(combo),
                sum(hosting[g.index] for g in combo),
                room if pack else -room,
                tuple(g.index for g in combo),
            )
            if best is None or key < best:
                best, best_set = key, combo
        if best_set:
            room = sum(free[g.index] for g in best_set)
            shares = [need_k * free[g.index] // room for g in best_set]
            shares[-1] += need_k - sum(shares)
            split = tuple(round(free[g.index] / room, 2) for g in best_set)
            return _Slot(pos, name, index, best_set, split, tuple(shares), need_k)
    return _Slot(pos, name, index, (), (), (), need)


def _subsets(allowed: list[GPU], size: int, free: dict[int, int]) -> list[tuple[GPU, ...]]:
    """Every GPU subset of a size, or only the roomiest one when there are too many."""
    if math.comb(len(allowed), size) <= MAX_SET_SEARCH:
        return list(itertools.combinations(allowed, size))
    roomiest = sorted(allowed, key=lambda g: (-free[g.index], g.index))[:size]
    return [tuple(sorted(roomiest, key=lambda g: g.index))]


def _all_peers(gpus: tuple[GPU, ...]) -> bool:
    """Whether every pair in the set is linked by NVLink (either side may report it)."""
    return all(
        b.index in a.nvlink_peers or a.index in b.nvlink_peers
        for a, b in itertools.combinations(gpus, 2)
    )


def _short_on_gpu(rid: str, need: int, gpu: GPU, free: dict[int, int]) -> str:
    planned = gpu.free_bytes - free[gpu.index]
    text = f"{rid}: needs {format_bytes(need)}, GPU {gpu.index} has {format_bytes(gpu.free_bytes)}"
    if planned:
        text += (
            f" free minus {format_bytes(planned)} planned for other replicas"
            f" = {format_bytes(free[gpu.index])}"
        )
    else:
        text += " free"
    return f"{text}, short by {format_bytes(need - free[gpu.index])}"


def _short_anywhere(rid: str, est: Estimate, allowed: list[GPU], free: dict[int, int]) -> str:
    """Name the set of GPUs that comes closest, and by how much it falls short."""
    roomiest = sorted(allowed, key=lambda g: (-free[g.index], g.index))
    best_size, best_slack = 1, -math.inf
    for size in range(1, len(roomiest) + 1):
        slack = sum(free[g.index] for g in roomiest[:size]) - (
            est.total + (size - 1) * est.per_extra_gpu
        )
        if slack > best_slack:
            best_size, best_slack = size, slack
    chosen = sorted(roomiest[:best_size], key=lambda g: g.index)
    need = est.total + (best_size - 1) * est.per_extra_gpu
    have = sum(g.free_bytes for g in chosen)
    left = sum(free[g.index] for g in chosen)
    text = f"{rid}: needs {format_bytes(need)}"
    if best_size > 1:
        text += f" split over {best_size} GPUs"
    text += (
        f", largest free set is GPU{'s' if best_size > 1 else ''} {_index_list(chosen)}: "
        f"{_sizes(chosen)}"
    )
    if have != left:
        text += (
            f" minus {format_bytes(have - left)} planned for other replicas"
            f" = {format_bytes(left)}"
        )
    return f"{text}, short by {format_bytes(need - left)}"


def _sizes(gpus: Sequence[GPU]) -> str:
    """'2×24.0 GiB = 48.0 GiB' or '1×48.0 GiB + 2×24.0 GiB = 96.0 GiB' (free memory)."""
    counts = Counter(g.free_bytes for g in gpus)
    groups = " + ".join(
        f"{n}×{format_bytes(size)}" for size, n in sorted(counts.items(), reverse=True)
    )
    return f"{groups} = {format_bytes(sum(g.free_bytes for g in gpus))}"


def _index_list(items: Sequence[GPU] | tuple[int, ...]) -> str:
    return ",".join(str(i if isinstance(i, int) else i.index) for i in items)


def _slot_key(slot: _Slot) -> tuple[int, int]:
    return (slot.order, slot.index)


def _split_cpus(cpus: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """n contiguous CPU sets as even as possible; single shared CPUs when n > len(cpus)."""
    if not cpus or n == 0:
        return [()] * n
    if n > len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(n)]
    base, extra = divmod(len(cpus), n)
    sets, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        sets.append(cpus[start:start + size])
        start += size
    return sets


def _with_cpus(
    slots: list[_Slot], cpus: tuple[int, ...]
) -> tuple[tuple[ReplicaPlan, ...], list[str]]:
    """Hand out CPU sets in config order and build the replicas' plans."""
    ordered = sorted(slots, key=_slot_key)
    sets = _split_cpus(cpus, len(ordered))
    notes = []
    if len(ordered) > len(cpus):
        notes.append(
            f"{len(ordered)} replicas share {len(cpus)} CPU{'s' if len(cpus) != 1 else ''}: "
            "CPU sets overlap (round-robin)"
        )
    replicas = tuple(
        ReplicaPlan(
            model=s.model,
            index=s.index,
            gpu_indexes=tuple(g.index for g in s.gpus),
            gpu_uuids=tuple(g.uuid for g in s.gpus),
            tensor_split=s.split,
            cpu_set=cpu_set,
            threads=max(1, len(cpu_set)),
            need_bytes=s.need,
            gpu_bytes=s.gpu_bytes,
        )
        for s, cpu_set in zip(ordered, sets, strict=True)
    )
    return replicas, notes


def _unplaced_plan(slot: _Slot) -> ReplicaPlan:
    return ReplicaPlan(
        model=slot.model, index=slot.index, gpu_indexes=(), gpu_uuids=(), tensor_split=(),
        cpu_set=(), threads=0, need_bytes=slot.need,
    )


def _cpu_ranges(cpus: Sequence[int]) -> str:
    """'0-3,8,10-11' for a CPU set."""
    if not cpus:
        return "-"
    parts, start, prev = [], cpus[0], cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def format_plan(plan: Plan, inventory: Inventory) -> str:
    """The plan as a plain-text table: replicas, GPUs, then problems and notes."""
    rows = [["MODEL", "REPLICA", "GPUS", "NEED", "SPLIT", "CPUS", "THREADS"]]
    every = [(r, True) for r in plan.replicas] + [(r, False) for r in plan.unplaced]
    for r, placed in every:
        if not placed:
            where = "unplaced"
        elif r.gpu_indexes:
            where = _index_list(r.gpu_indexes)
        else:
            where = "cpu"
        rows.append([
            r.model,
            str(r.index),
            where,
            format_bytes(r.need_bytes),
            ",".join(f"{s:.2f}" for s in r.tensor_split) or "-",
            _cpu_ranges(r.cpu_set) if placed else "-",
            str(r.threads) if placed else "-",
        ])
    lines = _table(rows) if len(rows) > 1 else ["(no models)"]
    lines.append("")
    if inventory.gpus:
        gpu_rows = [["GPU", "NAME", "TOTAL", "FREE", "PLANNED", "LEFT"]]
        for g in inventory.gpus:
            planned = plan.planned_bytes(g.index)
            gpu_rows.append([
                str(g.index),
                g.name,
                format_bytes(g.total_bytes),
                format_bytes(g.free_bytes),
                format_bytes(planned),
                format_bytes(g.free_bytes - planned),
            ])
        lines.extend(_table(gpu_rows))
    else:
        lines.append(f"no GPUs: CPU-only host with {len(inventory.cpus)} CPUs")
    if inventory.simulated:
        lines.append("(simulated host)")
    lines.append("")
    if plan.fits:
        lines.append("fits: yes")
    else:
        count = len(plan.problems)
        lines.append(f"fits: no ({count} problem{'s' if count != 1 else ''})")
        lines.extend(f"  {p}" for p in plan.problems)
    if plan.notes:
        lines.append("notes:")
        lines.extend(f"  {n}" for n in plan.notes)
    return "\n".join(lines) + "\n"


def _replica_json(r: ReplicaPlan) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "index": r.index,
        "gpus": list(r.gpu_indexes),
        "gpu_uuids": list(r.gpu_uuids),
        "tensor_split": list(r.tensor_split),
        "cpus": list(r.cpu_set),
        "threads": r.threads,
        "need_bytes": r.need_bytes,
        "gpu_bytes": list(r.gpu_bytes),
    }


def plan_to_json(plan: Plan, inventory: Inventory) -> dict[str, Any]:
    """The plan as JSON-ready data, with the GPUs' planned use."""
    return {
        "fits": plan.fits,
        "problems": list(plan.problems),
        "notes": list(plan.notes),
        "simulated": inventory.simulated,
        "cpus": len(inventory.cpus),
        "replicas": [_replica_json(r) for r in plan.replicas],
        "unplaced": [_replica_json(r) for r in plan.unplaced],
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "total_bytes": g.total_bytes,
                "free_bytes": g.free_bytes,
                "planned_bytes": plan.planned_bytes(g.index),
                "left_bytes": g.free_bytes - plan.planned_bytes(g.index),
                "nvlink_peers": list(g.nvlink_peers),
            }
            for g in inventory.gpus
        ],
    }
