"""Metrics: counters and histograms we drive, gauges read from a /status provider."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from supervisor.metrics import LATENCY_BUCKETS, TTFT_BUCKETS, Metrics

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "status_sample.json"


def sample_status() -> dict[str, Any]:
    """The shared sample /status document."""
    return json.loads(SAMPLE.read_text())


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of render(), keyed by (name, labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str
) -> float:
    """The sample with exactly these labels."""
    return found[(metric, frozenset(labels.items()))]


def families(metrics: Metrics) -> dict[str, str]:
    """Family name -> type."""
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())}


def test_request_counters_and_histograms() -> None:
    m = Metrics()
    m.observe_request("gemma3-270m", "/v1/chat/completions", 200, 1.5, 0.2, 100, 20, 64)
    m.observe_request("gemma3-270m", "/v1/chat/completions", 200, 0.07, None, 10, 0, 0)
    m.observe_request("gemma3-270m", "/v1/chat/completions", 503, 0.01, None, 0, 0, 0)
    found = samples(m)
    chat = {"model": "gemma3-270m", "endpoint": "/v1/chat/completions"}
    assert value(found, "llm_supervisor_requests_total", status="200", **chat) == 2
    assert value(found, "llm_supervisor_requests_total", status="503", **chat) == 1
    assert value(found, "llm_supervisor_request_duration_seconds_count", **chat) == 3
    total = value(found, "llm_supervisor_request_duration_seconds_sum", **chat)
    assert total == pytest.approx(1.58)
    assert value(found, "llm_supervisor_request_duration_seconds_bucket", le="0.05", **chat) == 1
    assert value(found, "llm_supervisor_request_duration_seconds_bucket", le="0.1", **chat) == 2
    assert value(found, "llm_supervisor_request_duration_seconds_bucket", le="2.5", **chat) == 3
    assert value(found, "llm_supervisor_request_duration_seconds_bucket", le="120.0", **chat) == 3
    assert value(found, "llm_supervisor_time_to_first_token_seconds_count", **chat) == 1
    assert value(found, "llm_supervisor_time_to_first_token_seconds_bucket", le="0.1", **chat) == 0
    assert value(found, "llm_supervisor_time_to_first_token_seconds_bucket", le="0.25", **chat) == 1
    assert value(found, "llm_supervisor_prompt_tokens_total", model="gemma3-270m") == 110
    assert value(found, "llm_supervisor_completion_tokens_total", model="gemma3-270m") == 20
    assert value(found, "llm_supervisor_cached_prompt_tokens_total", model="gemma3-270m") == 64


def test_bucket_ranges_fit_llm_latency() -> None:
    assert LATENCY_BUCKETS[0] == 0.05 and LATENCY_BUCKETS[-1] == 120.0
    assert TTFT_BUCKETS[0] == 0.01 and TTFT_BUCKETS[-1] == 30.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert list(TTFT_BUCKETS) == sorted(TTFT_BUCKETS)


def test_queue_wait_restarts_hangs_evictions() -> None:
    m = Metrics()
    m.observe_queue_wait("llama3.3-70b", 1.84)
    m.observe_queue_wait("llama3.3-70b", 0.0)
    for cause in ("health", "stall", "canary", "process", "crash"):
        m.hang("gemma3-270m", cause)
    m.hang("gemma3-270m", "stall")
    m.hang("gemma3-270m", "cosmic-ray")
    m.restart("gemma3-270m", "crash")
    m.restart("gemma3-270m", "admin")
    m.restart("gemma3-270m", "no such cause")
    m.eviction("qwen2.5-coder-7b")
    m.eviction("qwen2.5-coder-7b")
    found = samples(m)
    assert value(found, "llm_supervisor_queue_wait_seconds_count", model="llama3.3-70b") == 2
    assert value(found, "llm_supervisor_queue_wait_seconds_sum", model="llama3.3-70b") == 1.84
    assert value(found, "llm_supervisor_hangs_total", model="gemma3-270m", cause="stall") == 2
    assert value(found, "llm_supervisor_hangs_total", model="gemma3-270m", cause="canary") == 1
    assert value(found, "llm_supervisor_hangs_total", model="gemma3-270m", cause="other") == 1
    assert value(found, "llm_supervisor_restarts_total", model="gemma3-270m", cause="crash") == 1
    assert value(found, "llm_supervisor_restarts_total", model="gemma3-270m", cause="admin") == 1
    assert value(found, "llm_supervisor_restarts_total", model="gemma3-270m", cause="other") == 1
    assert value(found, "llm_supervisor_evictions_total", model="qwen2.5-coder-7b") == 2


def test_status_gauges_from_provider() -> None:
    calls = []

    def provider() -> dict[str, Any]:
        calls.append(1)
        return sample_status()

    m = Metrics(provider)
    found = samples(m)
    assert len(calls) == 1  # read at scrape time, once per scrape
    assert value(found, "llm_supervisor_ready") == 1
    assert value(found, "llm_supervisor_draining") == 0
    assert value(found, "llm_supervisor_uptime_seconds") == 3725.4
    assert value(found, "llm_supervisor_client_connections") == 3
    assert value(found, "llm_supervisor_client_connections_refused_total") == 2
    assert value(found, "llm_supervisor_client_header_timeouts_total") == 5

    r0 = {"replica": "gemma3-270m/0", "model": "gemma3-270m"}
    assert value(found, "llm_supervisor_replica_in_flight", **r0) == 2
    assert value(found, "llm_supervisor_replica_slots", **r0) == 4
    assert value(found, "llm_supervisor_replica_uptime_seconds", **r0) == 3712
    assert value(found, "llm_supervisor_replica_tokens_per_second", **r0) == 412.7
    r1 = {"replica": "gemma3-270m/1", "model": "gemma3-270m"}
    assert value(found, "llm_supervisor_replica_restarts_total", **r1) == 1

    q0 = {"replica": "qwen2.5-coder-7b/0", "model": "qwen2.5-coder-7b"}
    states = {
        state: value(found, "llm_supervisor_replica_state", state=state, **q0)
        for state in ("STOPPED", "STARTING", "READY", "UNHEALTHY", "BACKOFF", "STOPPING", "FATAL")
    }
    assert states == {s: (1.0 if s == "BACKOFF" else 0.0) for s in states}
    assert value(found, "llm_supervisor_replica_state", state="READY", **r0) == 1
    # a replica without uptime (not running) has no uptime sample, not a zero
    assert ("llm_supervisor_replica_uptime_seconds", frozenset(q0.items())) not in found

    assert value(found, "llm_supervisor_queue_depth", model="llama3.3-70b") == 3
    assert value(found, "llm_supervisor_queue_max", model="llama3.3-70b") == 64
    assert value(found, "llm_supervisor_model_replicas", model="qwen2.5-coder-7b") == 1
    assert value(found, "llm_supervisor_model_ready_replicas", model="qwen2.5-coder-7b") == 0

    g1 = {
        "gpu": "1",
        "uuid": "GPU-8f1c2a10-0000-4000-8000-000000000001",
        "name": "NVIDIA H100 80GB HBM3",
    }
    assert value(found, "llm_supervisor_gpu_memory_used_bytes", **g1) == 83214991360
    assert value(found, "llm_supervisor_gpu_memory_total_bytes", **g1) == 85520809984
    assert value(found, "llm_supervisor_gpu_utilization_percent", **g1) == 41
    assert value(found, "llm_supervisor_gpu_temperature_celsius", **g1) == 57
    assert value(found, "llm_supervisor_gpu_power_watts", **g1) == 301.0

    types = families(m)
    assert types["llm_supervisor_replica_state"] == "gauge"
    assert types["llm_supervisor_replica_restarts"] == "counter"
    assert types["llm_supervisor_request_duration_seconds"] == "histogram"


def test_unknown_state_is_reported_too() -> None:
    status = {"replicas": [{"id": "m/0", "model": "m", "state": "WEIRD"}]}
    found = samples(Metrics(lambda: status))
    m0 = {"replica": "m/0", "model": "m"}
    assert value(found, "llm_supervisor_replica_state", state="WEIRD", **m0) == 1
    assert value(found, "llm_supervisor_replica_state", state="READY", **m0) == 0


def test_cpu_only_status_has_no_gpu_samples() -> None:
    status = sample_status()
    status["gpus"] = []
    found = samples(Metrics(lambda: status))
    assert not [k for k in found if k[0].startswith("llm_supervisor_gpu_")]


def test_provider_errors_do_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("pool not started")

    m = Metrics(broken)
    m.observe_queue_wait("m", 0.5)
    found = samples(m)
    assert value(found, "llm_supervisor_queue_wait_seconds_count", model="m") == 1
    assert "llm_supervisor_ready" not in {k[0] for k in found}
    assert "failed to read status for metrics" in caplog.text


def test_set_provider_later() -> None:
    m = Metrics()
    assert "llm_supervisor_ready" not in {k[0] for k in samples(m)}
    m.set_provider(lambda: {"ready": False, "uptime_s": 1.0, "connections": None})
    found = samples(m)
    assert value(found, "llm_supervisor_ready") == 0
    # not listening yet: no connection samples rather than zeros
    assert not any(name.startswith("llm_supervisor_client_") for name, _ in found)


def test_private_registry() -> None:
    a, b = Metrics(), Metrics()  # a second instance must not collide on names
    a.observe_queue_wait("m", 1.0)
    assert value(samples(a), "llm_supervisor_queue_wait_seconds_count", model="m") == 1
    count = "llm_supervisor_queue_wait_seconds_count"
    assert (count, frozenset({("model", "m")})) not in samples(b)
    assert REGISTRY.get_sample_value(count, {"model": "m"}) is None
