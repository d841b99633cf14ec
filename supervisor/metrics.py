"""Prometheus metrics: request counters and histograms, plus gauges read from /status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "llm_supervisor_"

# Whole requests run from tens of milliseconds (short completions, embeddings) to
# minutes (long generations); TTFT is dominated by prompt processing and queueing.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REPLICA_STATES = ("STOPPED", "STARTING", "READY", "UNHEALTHY", "BACKOFF", "STOPPING", "FATAL")
HANG_CAUSES = frozenset({"health", "stall", "canary", "process", "crash"})
# A restart can also be asked for (admin API) or rolled by a config reload.
RESTART_CAUSES = HANG_CAUSES | {"admin", "reload"}

StatusProvider = Callable[[], Mapping[str, Any]]


def _cause(cause: str, allowed: frozenset[str]) -> str:
    """Bound label cardinality: unknown causes become 'other'."""
    if cause in allowed:
        return cause
    logger.debug("relabelled unknown cause %r as 'other'", cause)
    return "other"


def _number(value: object) -> float | None:
    """A gauge value from JSON, or None when absent or not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class StatusCollector(Collector):
    """Per-replica, per-model and per-GPU gauges built from the /status JSON at scrape time."""

    def __init__(self, provider: Callable[[], StatusProvider | None]) -> None:
        self._provider = provider

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe up front: the families depend on the live status."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield gauge families for the current status; nothing if it cannot be read."""
        provider = self._provider()
        if provider is None:
            return
        try:
            status = provider()
        except Exception:
            logger.warning("failed to read status for metrics", exc_info=True)
            return
        yield from _daemon_families(status)
        yield from _connection_families(status.get("connections") or {})
        yield from _replica_families(status.get("replicas") or [])
        yield from _model_families(status.get("models") or [])
        yield from _gpu_families(status.get("gpus") or [])


def _daemon_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Daemon-wide gauges: ready, draining, uptime."""
    for key, name, doc in (
        ("ready", "ready", "1 when every model has a READY replica"),
        ("draining", "draining", "1 while the daemon drains before exit"),
        ("uptime_s", "uptime_seconds", "Seconds since the daemon started"),
    ):
        value = _number(status.get(key))
        if value is not None:
            family = GaugeMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


def _connection_families(conns: Mapping[str, Any]) -> Iterator[Metric]:
    """Client connections: open now; refused and timed out since the start."""
    for key, name, doc, kind in (
        ("open", "client_connections", "Open client connections", GaugeMetricFamily),
        ("refused", "client_connections_refused",
         "Client connections refused past server.max_connections", CounterMetricFamily),
        ("head_timeouts", "client_header_timeouts",
         "Client connections closed for no request head within server.header_timeout",
         CounterMetricFamily),
    ):
        value = _number(conns.get(key))
        if value is not None:
            family = kind(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


def _replica_families(replicas: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """Per-replica gauges plus a state-set gauge (one 0/1 sample per state)."""
    labels = ["replica", "model"]
    in_flight = GaugeMetricFamily(
        PREFIX + "replica_in_flight", "Requests in flight on the replica", labels=labels
    )
    slots = GaugeMetricFamily(
        PREFIX + "replica_slots", "Parallel sequence slots of the replica", labels=labels
    )
    uptime = GaugeMetricFamily(
        PREFIX + "replica_uptime_seconds", "Seconds since the replica became ready", labels=labels
    )
    restarts = CounterMetricFamily(
        PREFIX + "replica_restarts", "Restarts of the replica so far", labels=labels
    )
    tps = GaugeMetricFamily(
        PREFIX + "replica_tokens_per_second", "Recent generation rate", labels=labels
    )
    state = GaugeMetricFamily(
        PREFIX + "replica_state",
        "Replica state: 1 for the current state, 0 for the others",
        labels=[*labels, "state"],
    )
    for replica in replicas:
        rid = str(replica.get("id", ""))
        values = [rid, str(replica.get("model", ""))]
        for family, key in (
            (in_flight, "in_flight"),
            (slots, "slots"),
            (uptime, "uptime_s"),
            (restarts, "restarts"),
            (tps, "tokens_per_s"),
        ):
            value = _number(replica.get(key))
            if value is not None:
                family.add_metric(values, value)
        current = str(replica.get("state", ""))
        known = REPLICA_STATES if current in REPLICA_STATES else (*REPLICA_STATES, current)
        for name in known:
            state.add_metric([*values, name], 1.0 if name == current else 0.0)
    yield from (in_flight, slots, uptime, restarts, tps, state)


def _model_families(models: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """Per-model gauges: queue depth and bound, replicas configured and ready."""
    families = {
        "queue_depth": GaugeMetricFamily(
            PREFIX + "queue_depth", "Requests waiting for a slot", labels=["model"]
        ),
        "queue_max": GaugeMetricFamily(
            PREFIX + "queue_max", "Bound of the model's wait queue", labels=["model"]
        ),
        "replicas": GaugeMetricFamily(
            PREFIX + "model_replicas", "Replicas configured for the model", labels=["model"]
        ),
        "ready": GaugeMetricFamily(
            PREFIX + "model_ready_replicas", "Replicas of the model in READY", labels=["model"]
        ),
    }
    for model in models:
        name = str(model.get("name", ""))
        for key, family in families.items():
            value = _number(model.get(key))
            if value is not None:
                family.add_metric([name], value)
    yield from families.values()


def _gpu_families(gpus: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """Per-GPU gauges: memory, utilization, temperature, power."""
    labels = ["gpu", "uuid", "name"]
    families = {
        "memory_used": GaugeMetricFamily(
            PREFIX + "gpu_memory_used_bytes", "GPU memory in use", labels=labels
        ),
        "memory_total": GaugeMetricFamily(
            PREFIX + "gpu_memory_total_bytes", "GPU memory in all", labels=labels
        ),
        "utilization": GaugeMetricFamily(
            PREFIX + "gpu_utilization_percent", "GPU compute utilization (0-100)", labels=labels
        ),
        "temperature": GaugeMetricFamily(
            PREFIX + "gpu_temperature_celsius", "GPU temperature", labels=labels
        ),
        "power_w": GaugeMetricFamily(PREFIX + "gpu_power_watts", "GPU power draw", labels=labels),
    }
    for gpu in gpus:
        values = [str(gpu.get("index", "")), str(gpu.get("uuid", "")), str(gpu.get("name", ""))]
        for key, family in families.items():
            value = _number(gpu.get(key))
            if value is not None:
                family.add_metric(values, value)
    yield from families.values()


class Metrics:
    """The daemon's metrics on a private registry (never prometheus_client's global one)."""

    def __init__(self, provider: StatusProvider | None = None) -> None:
        self._endpoint_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._model_children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._provider = provider
        self._requests = Counter(
            PREFIX + "requests",
            "Requests answered, by model, endpoint and HTTP status",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request received to last byte sent",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request received to first response byte",
            ["model", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self._completion_tokens = Counter(
            PREFIX + "completion_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self._cached_tokens = Counter(
            PREFIX + "cached_prompt_tokens",
            "Prompt tokens served from the engine's prefix cache",
            ["model"],
            registry=self.registry,
        )
        self._queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time a request waited for a free slot",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self._restarts = Counter(
            PREFIX + "restarts",
            "Replica restarts, by cause",
            ["model", "cause"],
            registry=self.registry,
        )
        self._hangs = Counter(
            PREFIX + "hangs",
            "Replicas found hung or dead, by the signal that caught it",
            ["model", "cause"],
            registry=self.registry,
        )
        self._evictions = Counter(
            PREFIX + "evictions",
            "Models an engine unloaded on its own and the supervisor reloaded",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(StatusCollector(lambda: self._provider))

    def set_provider(self, provider: StatusProvider | None) -> None:
        """Set the callable that returns the /status JSON at scrape time."""
        self._provider = provider

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        latency_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> None:
        """Record one finished request."""
        requests, latency, ttft = self._per_endpoint(model, endpoint, status)
        requests.inc()
        latency.observe(max(0.0, latency_s))
        if ttft_s is not None:
            ttft.observe(max(0.0, ttft_s))
        prompt, completion, cached, _wait = self._per_model(model)
        if prompt_tokens > 0:
            prompt.inc(prompt_tokens)
        if completion_tokens > 0:
            completion.inc(completion_tokens)
        if cached_tokens > 0:
            cached.inc(cached_tokens)

    # labels() costs a lock and a dict lookup per call; the hot path keeps the children.
    def _per_endpoint(self, model: str, endpoint: str, status: int) -> tuple[Any, Any, Any]:
        key = (model, endpoint, status)
        children = self._endpoint_children.get(key)
        if children is None:
            children = (self._requests.labels(model, endpoint, str(status)),
                        self._latency.labels(model, endpoint),
                        self._ttft.labels(model, endpoint))
            self._endpoint_children[key] = children
        return children

    def _per_model(self, model: str) -> tuple[Any, Any, Any, Any]:
        children = self._model_children.get(model)
        if children is None:
            children = (self._prompt_tokens.labels(model), self._completion_tokens.labels(model),
                        self._cached_tokens.labels(model), self._queue_wait.labels(model))
            self._model_children[model] = children
        return children

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Record how long a request waited for a slot."""
        self._per_model(model)[3].observe(max(0.0, seconds))

    def restart(self, model: str, cause: str) -> None:
        """Count a replica restart (cause: health|stall|canary|process|crash|admin|reload)."""
        self._restarts.labels(model, _cause(cause, RESTART_CAUSES)).inc()

    def hang(self, model: str, cause: str) -> None:
        """Count a replica caught hung or dead (cause: health|stall|canary|process|crash)."""
        self._hangs.labels(model, _cause(cause, HANG_CAUSES)).inc()

    def eviction(self, model: str) -> None:
        """Count an engine-side unload that the supervisor had to undo."""
        self._evictions.labels(model).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
