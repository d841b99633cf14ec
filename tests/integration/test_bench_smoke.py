"""The benchmarks run end to end with tiny counts (`--quick`) and print what they promise.

These prove the scripts work, never how fast anything is: assertions are on the shape of
the results (numbers present, positive where they must be), not on their values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench.common import (
    CHAT,
    RawClient,
    chat_body,
    closed_loop,
    percentile,
    summarize,
    table,
)
from tests.fakes.spawn import start_llama

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tests" / "bench"


def run_bench(script: str, json_path: Path, *extra: str) -> str:
    """Run a bench as the Makefile does (a script path); its stdout. Fails on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--no-install", "--json",
         str(json_path), *extra],
        capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_percentile_and_summary() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    s = summarize([float(i) for i in range(1, 101)])
    assert s["n"] == 100 and s["max"] == 100.0 and s["p50"] == 50.5
    assert abs(s["p99"] - 99.01) < 1e-9
    text = table(["a", "bb"], [["1", "2"], ["333", "4"]])
    assert text.splitlines()[0].split() == ["a", "bb"]
    assert len(text.splitlines()) == 4


async def test_clients_against_the_fake_engine() -> None:
    with start_llama(["--fake-token-rate", "0"]) as fake:
        client = RawClient(fake.port, CHAT)
        try:
            for stream in (False, True, False):
                body = json.dumps(chat_body(3, stream=stream)).encode()
                status, raw = client.post(client.request_bytes(body))
                assert status == 200
                if stream:
                    assert raw.rstrip().endswith(b"data: [DONE]")
                else:
                    assert json.loads(raw)["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        finally:
            client.close()
        result = await closed_loop(fake.url + CHAT, chat_body(2), concurrency=4, duration=0.5)
    assert result.tool == "aiohttp"
    assert result.requests > 0 and result.errors == 0
    assert positive(result.rps)
    assert positive(result.latency_ms["p50"])


@pytest.mark.slow
def test_overhead_bench_quick(tmp_path: Path) -> None:
    out_path = tmp_path / "overhead.json"
    stdout = run_bench("overhead.py", out_path)
    for heading in ("mode", "target", "p50 ms", "p99 ms", "added p50", "req/s",
                    "daemon req/s / haproxy req/s"):
        assert heading in stdout
    results = json.loads(out_path.read_text())
    assert results["bench"] == "overhead" and results["quick"] is True
    lat = results["latency"]
    names = ["direct", "daemon"] + (["haproxy"] if results["haproxy"] else [])
    for mode in ("non_stream", "stream"):
        rows = lat[mode]["targets"]
        assert sorted(rows) == sorted(names)
        for name in names:
            row = rows[name]
            assert row["ok"] == lat["requests"] and row["errors"] == 0, (mode, name, row)
            assert positive(row["p50_ms"]) and positive(row["p99_ms"])
            assert row["p99_ms"] >= row["p50_ms"]
            if name != "direct":
                assert number(row["added_p50_ms"]) and number(row["added_p99_ms"])
                assert isinstance(row["pass_p50"], bool) and isinstance(row["pass_p99"], bool)
        for ratio in lat[mode]["daemon_vs_haproxy_added"].values():
            assert ratio is None or positive(ratio)
    assert positive(lat["cpu_us_per_request"]["daemon"])
    thr = results["throughput"]
    assert thr["tool"] in ("wrk", "aiohttp")
    assert positive(thr["targets"]["daemon"]["rps"])
    assert thr["targets"]["daemon"]["errors"] == 0
    if results["haproxy"]:
        assert "PASS" in stdout or "MISS" in stdout
        assert positive(thr["targets"]["haproxy"]["rps"])
        assert positive(thr["ratio"]) and isinstance(thr["pass"], bool)
    else:
        assert thr["ratio"] is None
        assert "HAProxy is unavailable" in stdout


@pytest.mark.slow
def test_streaming_bench_quick(tmp_path: Path) -> None:
    out_path = tmp_path / "streaming.json"
    stdout = run_bench("streaming.py", out_path)
    for heading in ("target", "completed", "gap p50", "gap p99", "gap max", "chunks/s per core",
                    "no stall"):
        assert heading in stdout
    results = json.loads(out_path.read_text())
    assert results["bench"] == "streaming" and results["quick"] is True
    settings = results["settings"]
    streams = settings["streams"] * settings["rounds"]
    for name in ("direct", "daemon"):
        row = results["targets"][name]
        assert row["streams"] == streams
        assert row["completed"] == streams and row["failed"] == 0, row["errors"]
        gap = row["max_gap_ms"]
        assert positive(gap["p50"]) and gap["max"] >= gap["p99"] >= gap["p50"]
        assert positive(row["ttft_ms"]["p50"]) and positive(row["total_ms"]["max"])
        # role chunk + one per token + the finish chunk + [DONE]
        assert row["events_per_stream"] == settings["tokens"] + 3
    assert results["chunks_per_core_s"] is None or positive(results["chunks_per_core_s"])
    assert isinstance(results["no_stall"], bool)
    assert len(results["phases"]) == 2 * settings["rounds"]
