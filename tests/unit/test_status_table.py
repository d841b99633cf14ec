"""format_status_table: the plain-text report behind `llm-supervisor status`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.tui import format_status_table

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "status_sample.json"


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Event times print in local time; pin it."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def sample() -> dict[str, Any]:
    return json.loads(SAMPLE.read_text())


def test_sample_report() -> None:
    text = format_status_table(sample())
    assert text == (
        "llm-supervisor 0.1.0 · ready · up 1h02m\n"
        "\n"
        "GPU  NAME                   MEMORY  USED           UTIL  TEMP  POWER\n"
        "0    NVIDIA H100 80GB HBM3  72%     57.0/79.6 GiB  87%   64°C  512 W\n"
        "1    NVIDIA H100 80GB HBM3  97%     77.5/79.6 GiB  41%   57°C  301 W\n"
        "\n"
        "REPLICA             MODEL             PLACE    STATE    PID    UPTIME  RESTARTS"
        "  LOAD  TOK/S  REASON\n"
        "gemma3-270m/0       gemma3-270m       gpu 0    READY    41873  1h01m   0       "
        "  2/4   412.7\n"
        "gemma3-270m/1       gemma3-270m       gpu 1    READY    42011  10m11s  1       "
        "  1/4   388.1\n"
        "llama3.3-70b/0      llama3.3-70b      gpu 0,1  READY    41902  1h00m   0       "
        "  2/2   31.4\n"
        "qwen2.5-coder-7b/0  qwen2.5-coder-7b  gpu 1    BACKOFF  -      -       3       "
        "  0/2   0.0    canary: no token within 10s\n"
        "\n"
        "MODEL             ENGINE        READY  QUEUE  LAST WAIT  REQUESTS  ERRORS\n"
        "gemma3-270m       llama-server  2/2    0/256  0.00s      1532      1\n"
        "llama3.3-70b      llama-server  1/1    3/64   1.84s      211       0\n"
        "qwen2.5-coder-7b  ollama        0/1    0/256  -          40        2\n"
        "\n"
        "TIME      KIND     REPLICA             MESSAGE\n"
        "23:14:20  restart  qwen2.5-coder-7b/0  backing off 8s (failure 3 of 5)\n"
        "23:13:20  crash    qwen2.5-coder-7b/0  exited with status 1: CUDA error: out of memory\n"
        "23:05:13  ready    gemma3-270m/1       ready in 12.7s\n"
        "23:05:01  restart  gemma3-270m/1       killed pid 41010 (SIGTERM), restarting\n"
        "23:05:00  hang     gemma3-270m/1       stall: no byte for 20s on a request in flight\n"
    )


def test_cpu_only_host() -> None:
    status = sample()
    status["gpus"] = []
    status["cpus"] = 16
    status["replicas"][0]["gpus"] = []
    status["replicas"][0]["cpus"] = [0, 1, 2, 3, 8, 10, 11]
    text = format_status_table(status)
    assert "CPU-only host: 16 cores" in text
    assert "GPU  NAME" not in text
    assert "cpu 0-3,8,10-11" in text


def test_headline_states() -> None:
    status = sample()
    status["ready"] = False
    assert format_status_table(status).startswith("llm-supervisor 0.1.0 · not ready · up 1h02m\n")
    status["draining"] = True
    assert " · draining · " in format_status_table(status).splitlines()[0]
    status["config"]["reload_error"] = "supervisor.yaml:3: models[0].slots: expected an integer"
    assert (
        format_status_table(status)
        .splitlines()[0]
        .endswith("reload refused: supervisor.yaml:3: models[0].slots: expected an integer")
    )


def test_events_limit() -> None:
    assert "spawned" in format_status_table(sample(), events=10)
    text = format_status_table(sample(), events=1)
    assert "backing off 8s" in text and "CUDA error" not in text
    assert "MESSAGE" not in format_status_table(sample(), events=0)


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"replicas": None, "gpus": None, "models": None, "events": None},
        {"replicas": [{"id": "m/0"}], "gpus": [{"index": 0}], "models": [{"name": "m"}]},
        {"replicas": ["not an object"], "uptime_s": "soon", "events": [{}]},
    ],
)
def test_partial_status_does_not_crash(status: dict[str, Any]) -> None:
    text = format_status_table(status)
    assert text.startswith("llm-supervisor ? · not ready · up -")
    assert text.endswith("\n")


def test_durations() -> None:
    status = {"replicas": [{"id": f"m/{i}", "uptime_s": s} for i, s in enumerate((5, 3600 * 50))]}
    text = format_status_table(status)
    assert " 5s " in text and " 2d02h " in text
