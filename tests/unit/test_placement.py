"""Placement: a pure function from inventory and estimates to a plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from supervisor.config import ModelConfig
from supervisor.estimate import GPU_CONTEXT_BYTES, Estimate
from supervisor.gpus import GPU, Inventory, simulated_inventory
from supervisor.placement import Plan, ReplicaPlan, format_plan, place, plan_to_json

GiB = 1024**3
MiB = 1024**2


def est(gib: float, compute: int = 0) -> Estimate:
    """An estimate of exactly ``gib`` GiB (plus ``compute`` bytes), all of it weights."""
    return Estimate(weights=int(gib * GiB), kv_cache=0, compute=compute, margin=0, n_layers=32)


def model(
    name: str,
    replicas: int | Literal["per-gpu"] = 1,
    gpus: tuple[int, ...] = (),
    engine: str = "llama-server",
) -> ModelConfig:
    return ModelConfig(
        name=name, modelfile=Path(f"/m/{name}.Modelfile"), replicas=replicas, gpus=gpus,
        engine=engine,
    )


def nvlinked(spec: str, links: dict[int, tuple[int, ...]], cpus: int = 8) -> Inventory:
    inv = simulated_inventory(spec, cpus=cpus)
    gpus = tuple(
        GPU(g.index, g.uuid, g.name, g.total_bytes, g.free_bytes, links.get(g.index, ()))
        for g in inv.gpus
    )
    return Inventory(gpus=gpus, cpus=inv.cpus, simulated=True)


@dataclass(frozen=True)
class Case:
    id: str
    inventory: Inventory
    models: list[tuple[ModelConfig, Estimate]]
    # replica id -> (GPU indexes, tensor split)
    expect: dict[str, tuple[tuple[int, ...], tuple[float, ...]]]
    fits: bool = True
    cpus: dict[str, tuple[int, ...]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


CASES = [
    Case(
        "one model on 1x80GiB",
        simulated_inventory("1x80GiB", cpus=4),
        [(model("gemma"), est(1))],
        {"gemma/0": ((0,), ())},
        cpus={"gemma/0": (0, 1, 2, 3)},
    ),
    Case(
        "two replicas on 1x80GiB share the GPU",
        simulated_inventory("1x80GiB", cpus=4),
        [(model("gemma", replicas=2), est(1))],
        {"gemma/0": ((0,), ()), "gemma/1": ((0,), ())},
        cpus={"gemma/0": (0, 1), "gemma/1": (2, 3)},
    ),
    Case(
        "per-gpu on 8x80GiB",
        simulated_inventory("8x80GiB", cpus=16),
        [(model("llama", replicas="per-gpu"), est(20))],
        {f"llama/{i}": ((i,), ()) for i in range(8)},
        cpus={f"llama/{i}": (2 * i, 2 * i + 1) for i in range(8)},
    ),
    Case(
        "per-gpu restricted to two GPUs",
        simulated_inventory("4x80GiB", cpus=4),
        [(model("llama", replicas="per-gpu", gpus=(1, 3)), est(20))],
        {"llama/0": ((1,), ()), "llama/1": ((3,), ())},
    ),
    Case(
        "40 GiB on 2x24GiB splits evenly",
        simulated_inventory("2x24GiB", cpus=4),
        [(model("mid"), est(40))],
        {"mid/0": ((0, 1), (0.5, 0.5))},
    ),
    Case(
        "mixed GPUs: the big model takes the 48, the small ones spread",
        simulated_inventory("2x24GiB,1x48GiB", cpus=6),
        [(model("small", replicas=2), est(10)), (model("big"), est(40))],
        {"big/0": ((2,), ()), "small/0": ((0,), ()), "small/1": ((1,), ())},
        cpus={"small/0": (0, 1), "small/1": (2, 3), "big/0": (4, 5)},
    ),
    Case(
        "mixed GPUs: a 60 GiB model splits 48+24 in proportion to free memory",
        simulated_inventory("2x24GiB,1x48GiB", cpus=2),
        [(model("big"), est(60))],
        {"big/0": ((0, 2), (0.33, 0.67))},
    ),
    Case(
        "different models share a GPU when memory allows",
        simulated_inventory("1x24GiB", cpus=2),
        [(model("a"), est(10)), (model("b"), est(10))],
        {"a/0": ((0,), ()), "b/0": ((0,), ())},
        cpus={"a/0": (0,), "b/0": (1,)},
    ),
    Case(
        "different models spread over GPUs before sharing",
        simulated_inventory("2x24GiB", cpus=2),
        [(model("a"), est(10)), (model("b"), est(10))],
        {"a/0": ((0,), ()), "b/0": ((1,), ())},
    ),
    Case(
        "NVLink-connected pair preferred over a PCIe pair",
        nvlinked("4x24GiB", {2: (3,), 3: (2,)}),
        [(model("mid"), est(40))],
        {"mid/0": ((2, 3), (0.5, 0.5))},
    ),
    Case(
        "NVLink reported on one side only still counts",
        nvlinked("4x24GiB", {3: (1,)}),
        [(model("mid"), est(40))],
        {"mid/0": ((1, 3), (0.5, 0.5))},
    ),
    Case(
        "replicas of a split model take different pairs",
        nvlinked("4x24GiB", {0: (1,), 1: (0,), 2: (3,), 3: (2,)}),
        [(model("mid", replicas=2), est(40))],
        {"mid/0": ((0, 1), (0.5, 0.5)), "mid/1": ((2, 3), (0.5, 0.5))},
    ),
    Case(
        "packing rescues what spreading cannot place",
        # spread: a->0, b->1, c->0, d->1, then e (3 GiB) finds 1 + 2 GiB left: no room.
        # pack: a, b fill GPU 0; c, d, e fill GPU 1.
        simulated_inventory("2x10GiB", cpus=5),
        [(model("a"), est(5)), (model("b"), est(5)), (model("c"), est(4)),
         (model("d"), est(3)), (model("e"), est(3))],
        {"a/0": ((0,), ()), "b/0": ((0,), ()), "c/0": ((1,), ()), "d/0": ((1,), ()),
         "e/0": ((1,), ())},
    ),
    Case(
        "CPU-only host, 2 cores, 2 replicas",
        simulated_inventory("cpu", cpus=2),
        [(model("gemma", replicas=2), est(1))],
        {"gemma/0": ((), ()), "gemma/1": ((), ())},
        cpus={"gemma/0": (0,), "gemma/1": (1,)},
    ),
    Case(
        "CPU-only host, 5 cores split 3+2",
        simulated_inventory("cpu", cpus=5),
        [(model("gemma", replicas=2), est(1))],
        {"gemma/0": ((), ()), "gemma/1": ((), ())},
        cpus={"gemma/0": (0, 1, 2), "gemma/1": (3, 4)},
    ),
    Case(
        "per-gpu on a CPU-only host is one replica",
        simulated_inventory("cpu", cpus=4),
        [(model("gemma", replicas="per-gpu"), est(1))],
        {"gemma/0": ((), ())},
        cpus={"gemma/0": (0, 1, 2, 3)},
    ),
    Case(
        "more replicas than cores share round-robin, with a note",
        simulated_inventory("cpu", cpus=2),
        [(model("gemma", replicas=3), est(1))],
        {"gemma/0": ((), ()), "gemma/1": ((), ()), "gemma/2": ((), ())},
        cpus={"gemma/0": (0,), "gemma/1": (1,), "gemma/2": (0,)},
        notes=("3 replicas share 2 CPUs: CPU sets overlap (round-robin)",),
    ),
    Case(
        "CPU-only host ignores a GPU restriction, with a note",
        simulated_inventory("cpu", cpus=2),
        [(model("gemma", gpus=(0,)), est(1000))],
        {"gemma/0": ((), ())},
        notes=("gemma: gpus [0] ignored: this host has no GPUs",),
    ),
    Case(
        "too big for the host",
        simulated_inventory("2x24GiB", cpus=2),
        [(model("qwen-72b"), est(50))],
        {},
        fits=False,
        problems=(
            "qwen-72b/0: needs 50.5 GiB split over 2 GPUs, largest free set is GPUs 0,1: "
            "2×24.0 GiB = 48.0 GiB, short by 2.5 GiB",
        ),
    ),
    Case(
        "second replica does not fit after the first",
        simulated_inventory("2x24GiB", cpus=2),
        [(model("qwen-72b", replicas=2), est(45))],
        {"qwen-72b/0": ((0, 1), (0.5, 0.5))},
        fits=False,
        problems=(
            "qwen-72b/1: needs 45.5 GiB split over 2 GPUs, largest free set is GPUs 0,1: "
            "2×24.0 GiB = 48.0 GiB minus 45.5 GiB planned for other replicas = 2.5 GiB, "
            "short by 43.0 GiB",
        ),
    ),
    Case(
        "per-gpu replica that does not fit its GPU",
        simulated_inventory("1x24GiB,1x8GiB", cpus=2),
        [(model("m", replicas="per-gpu"), est(10))],
        {"m/0": ((0,), ())},
        fits=False,
        problems=("m/1: needs 10.0 GiB, GPU 1 has 8.0 GiB free, short by 2.0 GiB",),
    ),
    Case(
        "a restriction to GPUs the host lacks",
        simulated_inventory("2x24GiB", cpus=2),
        [(model("m", gpus=(1, 5)), est(1))],
        {"m/0": ((1,), ())},
        fits=False,
        problems=("m: gpus [5] not on this host (GPUs: 0,1)",),
    ),
    Case(
        "ollama models are planned per GPU like the rest",
        simulated_inventory("2x24GiB", cpus=4),
        [(model("a", engine="ollama", replicas="per-gpu"), est(5)),
         (model("b", engine="ollama"), est(5))],
        {"a/0": ((0,), ()), "a/1": ((1,), ()), "b/0": ((0,), ())},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_place(case: Case) -> None:
    plan = place(case.inventory, case.models)
    got = {r.id: (r.gpu_indexes, r.tensor_split) for r in plan.replicas}
    assert got == case.expect
    assert plan.fits is case.fits
    for rid, cpus in case.cpus.items():
        replica = next(r for r in plan.replicas if r.id == rid)
        assert replica.cpu_set == cpus, rid
        assert replica.threads == len(cpus)
    if case.problems or not case.fits:
        assert plan.problems == case.problems
    assert plan.notes == case.notes
    # Invariants: nothing over-committed; uuids match indexes; bytes add up.
    by_index = {g.index: g for g in case.inventory.gpus}
    for g in case.inventory.gpus:
        assert 0 <= plan.planned_bytes(g.index) <= g.free_bytes
    for r in plan.replicas:
        assert r.gpu_uuids == tuple(by_index[i].uuid for i in r.gpu_indexes)
        if r.gpu_indexes:
            assert sum(r.gpu_bytes) == r.need_bytes
    assert place(case.inventory, case.models) == plan  # pure and deterministic


def test_split_need_includes_the_extra_gpu() -> None:
    compute = 100 * MiB
    plan = place(simulated_inventory("2x24GiB", cpus=2), [(model("mid"), est(40, compute))])
    (replica,) = plan.replicas
    assert replica.need_bytes == 40 * GiB + compute + (compute + GPU_CONTEXT_BYTES)
    assert replica.gpu_bytes == (replica.need_bytes // 2, replica.need_bytes // 2)


def test_split_bytes_follow_free_memory() -> None:
    inv = simulated_inventory("1x24GiB,1x48GiB", cpus=2)
    plan = place(inv, [(model("big"), est(60))])
    (replica,) = plan.replicas
    small, large = replica.gpu_bytes
    assert abs(large - 2 * small) <= 2
    assert plan.planned_bytes(0) == small and plan.planned_bytes(1) == large


def test_replicas_listed_in_config_order() -> None:
    inv = simulated_inventory("2x24GiB,1x48GiB", cpus=6)
    plan = place(inv, [(model("small", replicas=2), est(10)), (model("big"), est(40))])
    assert [r.id for r in plan.replicas] == ["small/0", "small/1", "big/0"]
    assert [r.id for r in plan.for_model("small")] == ["small/0", "small/1"]


def test_unplaced_replicas_are_kept_for_the_table() -> None:
    plan = place(simulated_inventory("1x24GiB", cpus=2), [(model("huge", replicas=2), est(30))])
    assert plan.replicas == ()
    assert [(r.id, r.need_bytes) for r in plan.unplaced] == [
        ("huge/0", 30 * GiB), ("huge/1", 30 * GiB),
    ]
    assert len(plan.problems) == 2


def test_free_memory_not_total_is_what_counts() -> None:
    inv = Inventory(
        gpus=(
            GPU(0, "GPU-0", "busy", 80 * GiB, 5 * GiB),
            GPU(1, "GPU-1", "idle", 80 * GiB, 80 * GiB),
        ),
        cpus=(0, 1),
    )
    plan = place(inv, [(model("m"), est(10))])
    assert plan.replicas[0].gpu_indexes == (1,)


def test_empty_models() -> None:
    plan = place(simulated_inventory("1x80GiB", cpus=2), [])
    assert plan == Plan(replicas=(), fits=True, problems=(), gpu_planned=((0, 0),))


def test_format_plan_gpu_host() -> None:
    inv = simulated_inventory("2x24GiB", cpus=4)
    plan = place(inv, [(model("mid"), est(40)), (model("huge"), est(100))])
    text = format_plan(plan, inv)
    lines = text.splitlines()
    assert lines[0].split() == ["MODEL", "REPLICA", "GPUS", "NEED", "SPLIT", "CPUS", "THREADS"]
    assert lines[1].split() == ["mid", "0", "0,1", "40.5", "GiB", "0.50,0.50", "0-3", "4"]
    assert lines[2].split() == ["huge", "0", "unplaced", "100.0", "GiB", "-", "-", "-"]
    assert "GPU  NAME" in text
    assert any(line.split()[:1] == ["0"] and "24.0 GiB" in line for line in lines)
    assert "fits: no (1 problem)" in text
    assert "  huge/0: needs 100.5 GiB split over 2 GPUs" in text
    assert "(simulated host)" in text


def test_format_plan_cpu_host() -> None:
    inv = simulated_inventory("cpu", cpus=2)
    plan = place(inv, [(model("gemma", replicas=2), est(1))])
    text = format_plan(plan, inv)
    assert "no GPUs: CPU-only host with 2 CPUs" in text
    assert "fits: yes" in text
    rows = [line.split() for line in text.splitlines()[1:3]]
    assert rows == [
        ["gemma", "0", "cpu", "1.0", "GiB", "-", "0", "1"],
        ["gemma", "1", "cpu", "1.0", "GiB", "-", "1", "1"],
    ]


def test_plan_to_json() -> None:
    inv = nvlinked("2x24GiB", {0: (1,), 1: (0,)}, cpus=4)
    plan = place(inv, [(model("mid"), est(40))])
    data: dict[str, Any] = json.loads(json.dumps(plan_to_json(plan, inv)))
    assert data["fits"] is True
    assert data["cpus"] == 4
    assert data["replicas"] == [{
        "id": "mid/0", "model": "mid", "index": 0, "gpus": [0, 1],
        "gpu_uuids": ["GPU-simulated-0", "GPU-simulated-1"], "tensor_split": [0.5, 0.5],
        "cpus": [0, 1, 2, 3], "threads": 4, "need_bytes": int(40.5 * GiB),
        "gpu_bytes": [int(20.25 * GiB), int(20.25 * GiB)],
    }]
    assert data["gpus"][0]["planned_bytes"] == int(20.25 * GiB)
    assert data["gpus"][0]["left_bytes"] == 24 * GiB - int(20.25 * GiB)
    assert data["gpus"][1]["nvlink_peers"] == [0]


def test_replica_plan_id() -> None:
    r = ReplicaPlan("gemma3-270m", 1, (), (), (), (0,), 1, 0)
    assert r.id == "gemma3-270m/1"
