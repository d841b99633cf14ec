"""The balance and affinity benches run end to end (--quick) and write well-formed JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bench.balance import EngineMissing, engine_binary

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tests" / "bench"
RUN_TIMEOUT = 600

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT + 60)]


def _need_engine() -> None:
    """Skip without the real engine, except under CI, where its absence is a failure."""
    try:
        engine_binary()
    except EngineMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real engine: {exc}")
        pytest.skip(str(exc))


def _run(script: str, out: Path, workdir: Path) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(out),
         "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops what it started on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"{script} ran past {RUN_TIMEOUT}s:\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"{script} failed:\n{stdout}\n{stderr}"
    assert "PASS" in stdout or "MISS" in stdout or "n/a" in stdout
    data = json.loads(out.read_text())
    assert isinstance(data, dict)
    return data


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _no_orphans(pids: list[int]) -> None:
    assert pids and all(isinstance(p, int) for p in pids)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text(errors="replace")]
        time.sleep(0.2)
    assert not alive, f"processes left running: {alive}"


def test_balance_quick_writes_figures(tmp_path: Path) -> None:
    _need_engine()
    data = _run("balance.py", tmp_path / "balance.json", tmp_path / "work")
    assert data["bench"] == "balance"
    assert data["params"]["quick"] is True
    assert isinstance(data["haproxy"], bool)
    assert data["rate_rps"] is None or (_num(data["rate_rps"]) and data["rate_rps"] > 0)
    fronts = data["front_ends"]
    expected = {"daemon", "haproxy_leastconn", "round_robin"} if data["haproxy"] else {"daemon"}
    assert set(fronts) == expected
    for name, f in fronts.items():
        assert isinstance(f["requests"], int) and f["requests"] > 0, name
        assert f["errors"] == 0 and f["ok"] == f["requests"], name
        for key in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s"):
            assert _num(f[key]), (name, key, f[key])
        assert f["latency_p50_s"] <= f["latency_p95_s"]
        assert f["ttft_p50_s"] <= f["ttft_p95_s"]
        assert _num(f["throughput_rps"]) and f["throughput_rps"] > 0
    if data["haproxy"]:
        assert _num(data["ratio_p95"]) and isinstance(data["pass"], bool)
    else:
        assert data["ratio_p95"] is None and data["pass"] is None
    results = data["results"]
    assert len(results) == sum(f["requests"] for f in fronts.values())
    assert all(r["max_tokens"] in (8, 64) for r in results)
    assert all(r["completion_tokens"] == r["max_tokens"] for r in results if r["ok"])
    assert all(0 < r["ttft"] <= r["latency"] for r in results if r["ok"])
    _no_orphans(data["pids"])


def test_affinity_quick_writes_figures(tmp_path: Path) -> None:
    _need_engine()
    data = _run("affinity.py", tmp_path / "affinity.json", tmp_path / "work")
    assert data["bench"] == "affinity"
    assert data["params"]["quick"] is True
    for run in ("on", "off"):
        s = data[run]
        for scope in ("all", "follow_up"):
            f = s[scope]
            assert isinstance(f["requests"], int) and f["requests"] > 0, (run, scope)
            assert f["ok"] == f["requests"], (run, scope)
            for key in ("ttft_p50_s", "ttft_p95_s", "cached_mean", "prompt_mean"):
                assert _num(f[key]), (run, scope, key, f[key])
            assert 0 <= f["cached_share"] <= 1
        assert s["prefix_hit_share"] is None or 0 <= s["prefix_hit_share"] <= 1
        assert len(s["rounds"]) == data["params"]["rounds"] == 1
        assert all(isinstance(r["cached_tokens"], int) for r in s["requests"])
        assert all(isinstance(r["conversation"], int) and isinstance(r["turn"], int)
                   for r in s["requests"])
        _no_orphans(s["pids"])
    assert _num(data["ratio_ttft_p50"]) and isinstance(data["pass"], bool)
