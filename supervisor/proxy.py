"""The hot path: hold a slot, relay one request to a replica, fail over before the first byte."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends.ollama import strip_reload_options
from .openai_compat import (
    Aggregator,
    SSEParser,
    Usage,
    dumps,
    error_event,
    loads,
    usage_from_tail,
    whole_answer,
)
from .pool import Lease, ModelPool, NoReplica, QueueFull, QueueTimeout
from .reply import Reply, answer_error
from .upstream import Disconnected, Response, Upstream, UpstreamError

logger = logging.getLogger(__name__)

TAIL_BYTES = 8192
STALE_RETRIES = 2


class Retry(Exception):
    """The replica failed before the client got a byte; another may serve it."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Outcome:
    """What one relayed request did, for accounting."""

    status: int
    usage: Usage | None
    ttft: float | None


Observer = Callable[[str, str, int, float, "float | None", "Usage | None"], None]


class Proxy:
    """Relays requests for every model over keep-alive connections to the engines."""

    def __init__(self, upstream: Upstream, observe: Observer | None = None,
                 observe_wait: Callable[[str, float], None] | None = None) -> None:
        self.upstream = upstream
        self.observe = observe
        self.observe_wait = observe_wait

    async def forward(self, reply: Reply, pool: ModelPool, body: dict[str, Any],
                      path: str, kind: str, priority: int, keys: list[str]) -> None:
        """Serve one request: acquire, relay, retry once elsewhere on an early failure."""
        started = time.monotonic()
        exclude: frozenset[str] = frozenset()
        pool.requests += 1
        last: Retry | None = None
        for attempt in range(2):
            try:
                lease = await pool.acquire(keys, priority, exclude)
            except QueueFull:
                return await self._refuse(
                    reply, pool, path, started, 429,
                    f"too many requests queued for model {pool.model.name!r}; retry later",
                    "queue_full", {"Retry-After": "1"})
            except QueueTimeout:
                return await self._refuse(
                    reply, pool, path, started, 503,
                    f"no free slot for model {pool.model.name!r} within "
                    f"{pool.model.queue_timeout:g}s", "queue_timeout")
            except NoReplica:
                if attempt and exclude:
                    exclude = frozenset()
                    try:
                        lease = await pool.acquire(keys, priority, exclude)
                    except (QueueFull, QueueTimeout, NoReplica):
                        break
                else:
                    return await self._refuse(
                        reply, pool, path, started, 503,
                        f"model {pool.model.name!r} has no replica able to serve", "no_replica")
            if self.observe_wait is not None:
                self.observe_wait(pool.model.name, lease.waited_s)
            served = False
            try:
                outcome = await self._relay(reply, lease, body, path, kind)
                served = outcome.status < 500
                self._account(pool, lease, path, started, outcome)
                return
            except Retry as exc:
                last = exc
                logger.warning("failed over from %s: %s", lease.replica.id, exc)
                exclude = frozenset({lease.replica.id})
            finally:
                lease.release(served=served)
        message = f"upstream failed: {last}" if last else "no replica able to serve"
        await self._refuse(reply, pool, path, started, last.status if last else 503, message,
                           "upstream_failed")

    async def _refuse(self, reply: Reply, pool: ModelPool, path: str, started: float,
                      status: int, message: str, code: str,
                      headers: Mapping[str, str] | None = None) -> None:
        """Answer with an error, counted like any other answer."""
        if status >= 500:
            pool.errors += 1
        if self.observe is not None:
            self.observe(pool.model.name, path, status, time.monotonic() - started, None, None)
        await answer_error(reply, status, message, code=code, headers=headers)

    def _account(self, pool: ModelPool, lease: Lease, path: str, started: float,
                 outcome: Outcome) -> None:
        if outcome.status >= 500:
            pool.errors += 1
        usage = outcome.usage
        if usage is not None:
            pool.tokens["prompt"] += usage.prompt
            pool.tokens["completion"] += usage.completion
            pool.tokens["cached"] += usage.cached
            lease.replica.note_tokens(usage.completion)
        if self.observe is not None:
            self.observe(pool.model.name, path, outcome.status,
                         time.monotonic() - started, outcome.ttft, usage)

    async def _relay(self, reply: Reply, lease: Lease, body: dict[str, Any],
                     path: str, kind: str) -> Outcome:
        replica = lease.replica
        model = replica.model
        launch = replica.launch
        client_stream = bool(body.get("stream")) and kind in ("chat", "text")
        upstream = strip_reload_options(body) if model.engine == "ollama" else dict(body)
        upstream["model"] = replica.backend.upstream_model(model)
        generates = kind in ("chat", "text")
        streamed = generates and launch is not None and (client_stream or launch.stream_upstream)
        if streamed:
            upstream["stream"] = True
            if not client_stream:
                upstream["stream_options"] = {"include_usage": True}
        # A whole answer comes at the end: no deadline where the replica's progress is
        # watched another way (see Replica._watch_progress), a generous one where not.
        watched = launch is not None and launch.progress_path is not None
        stall = model.stall_timeout
        whole_timeout = None if watched else max(stall * 3, 60.0)
        url = replica.base_url + path
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            up = await self._post(url, upstream, stall * 2 if streamed else whole_timeout)
        except TimeoutError:
            replica.report_hang("stall", f"no response from the engine in {stall * 2:g}s")
            raise Retry(f"{replica.id} stalled: no response in {stall * 2:g}s", 504) from None
        except UpstreamError as exc:
            raise Retry(f"{replica.id}: {exc}") from None
        try:
            if up.status >= 500:
                text = (await up.read(stall * 2))[:300].decode("utf-8", "replace")
                raise Retry(f"{replica.id} answered {up.status}: {text}")
            if up.status != 200 or not streamed:
                data = await up.read(whole_timeout)
                usage = ttft = None
                if generates and up.status == 200:
                    usage, after_first = whole_answer(data)
                    if after_first is not None:  # the first token came that long before the end
                        ttft = max(0.0, loop.time() - t0 - after_first)
                await reply.answer(up.status, data, up.content_type or "application/json")
                return Outcome(up.status, usage, ttft)
            if client_stream:
                return await self._stream(reply, lease, up, stall, t0)
            return await self._aggregate(reply, up, kind, stall, t0, lease)
        except TimeoutError:
            replica.report_hang("stall", f"no byte from the engine for {stall:g}s")
            raise Retry(f"{replica.id} stalled: no byte for {stall:g}s", 504) from None
        except UpstreamError as exc:
            raise Retry(f"{replica.id}: {exc}") from None
        finally:
            if up.complete:
                up.release()
            else:
                up.close()  # the engine sees the disconnect and frees the slot

    async def _post(self, url: str, body: dict[str, Any], first_byte: float | None) -> Response:
        """POST upstream; a pooled connection the engine already closed is retried fresh.

        The first byte may wait for prompt processing, so it gets `first_byte` seconds.
        """
        data = dumps(body)
        for attempt in range(STALE_RETRIES + 1):
            try:
                return await self.upstream.post(url, data, timeout=first_byte)
            except Disconnected:
                # Nothing was generated: the engine closed an idle keep-alive socket (or is
                # gone, and the next try is refused at once: UpstreamError, failover).
                if attempt == STALE_RETRIES:
                    raise
        raise AssertionError("unreachable")

    async def _aggregate(self, reply: Reply, up: Response, kind: str, stall: float,
                         t0: float, lease: Lease) -> Outcome:
        replica_id = lease.replica.id
        loop = asyncio.get_running_loop()
        parser = SSEParser()
        agg = Aggregator(kind)
        ttft: float | None = None
        while data := await up.read_chunk(stall if ttft is not None else stall * 2):
            if ttft is None:
                ttft = loop.time() - t0
            for payload in parser.feed(data):
                agg.add(payload)
        if agg.error is not None:
            status = int(agg.error.get("error", {}).get("code") or 500)
            if status >= 500:
                raise Retry(f"{replica_id} sent an error: {agg.error}")
            await reply.answer(status, dumps(agg.error))
            return Outcome(status, None, ttft)
        if not agg.done:
            raise Retry(f"{replica_id} cut the stream before the end")
        await reply.answer(200, dumps(agg.result()))
        return Outcome(200, agg.usage, ttft)

    async def _stream(self, reply: Reply, lease: Lease, up: Response,
                      stall: float, t0: float) -> Outcome:
        replica = lease.replica
        loop = asyncio.get_running_loop()
        first = await up.read_chunk(stall * 2)
        if not first:
            raise Retry(f"{replica.id} closed the stream before the first byte")
        ttft = loop.time() - t0
        await reply.start_stream()
        await reply.send(first)
        tail = first[-TAIL_BYTES:]
        try:
            while data := await up.read_chunk(stall):
                await reply.send(data)
                tail = (tail + data)[-TAIL_BYTES:]
        except TimeoutError:
            replica.report_hang("stall", f"no byte from the engine for {stall:g}s")
            await self._break(reply, f"{replica.id} stalled mid-stream")
            return Outcome(504, None, ttft)
        except UpstreamError as exc:
            await self._break(reply, f"{replica.id} failed mid-stream: {exc}")
            return Outcome(502, None, ttft)
        if not tail.rstrip().endswith(b"[DONE]"):
            await self._break(reply, f"{replica.id} ended the stream early")
            return Outcome(502, usage_from_tail(tail), ttft)
        await reply.end()
        return Outcome(200, usage_from_tail(tail), ttft)

    @staticmethod
    async def _break(reply: Reply, message: str) -> None:
        """End a stream that is under way with an error event, never a silent hang."""
        logger.warning("broke stream: %s", message)
        try:
            await reply.send(error_event(502, message))
            await reply.end()
        except (ConnectionError, RuntimeError):
            pass


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or ValueError saying what is wrong."""
    try:
        body = loads(raw)
    except ValueError as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body
