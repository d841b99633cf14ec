"""Placement on a simulated GPU host: the exact argv and environment every child gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.daemon_proc import REPO, DaemonProc, engine_call, fake_model, wait_gone


def test_pinned_replicas_and_a_layer_split_on_2x24gib(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, [
        fake_model("small", replicas="per-gpu"),
        # 64 slots × 131072 ctx of the demo model needs ~28 GiB: no single 24 GiB GPU holds it
        fake_model("big", replicas=1, slots=64, ctx=131072),
    ])
    d.start(args=("--gpus", "2x24GiB"))
    try:
        d.wait_ready()
        status = d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]),
                        what="all READY")
        seen = {}
        for rep in status["replicas"]:
            stats = engine_call(rep["port"], "/fake/stats")
            seen[rep["id"]] = (rep["gpus"], stats["env"]["CUDA_VISIBLE_DEVICES"],
                               stats["config"]["n_gpu_layers"], stats["config"]["split_mode"],
                               stats["config"]["tensor_split"], stats["config"]["parallel"])
        assert seen["small/0"] == ([0], "GPU-simulated-0", "999", None, None, 2)
        assert seen["small/1"] == ([1], "GPU-simulated-1", "999", None, None, 2)
        assert seen["big/0"] == ([0, 1], "GPU-simulated-0,GPU-simulated-1", "999", "layer",
                                 "0.5,0.5", 64)
    finally:
        pids = d.descendants()
        d.stop()
        assert wait_gone(pids) == []


def test_serve_refuses_a_plan_that_does_not_fit_and_prints_the_table(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, [fake_model("big", replicas=2, slots=64, ctx=131072)])
    out = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "serve", "-c", str(d.config_path),
         "--gpus", "1x16GiB"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert "refusing to start: the configured models do not fit this host" in out.stderr
    assert "big/0: needs" in out.stderr and "short by" in out.stderr
    assert "GPU  NAME" in out.stderr


def test_plan_json_for_a_hypothetical_host(tmp_path: Path) -> None:
    import json

    d = DaemonProc(tmp_path, [fake_model("m", replicas="per-gpu")])
    out = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "plan", "-c", str(d.config_path),
         "--gpus", "8x80GiB", "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] is True
    assert sorted(r["gpus"][0] for r in plan["replicas"]) == list(range(8))
