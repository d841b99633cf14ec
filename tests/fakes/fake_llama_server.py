#!/usr/bin/env python3
"""A fake llama.cpp `llama-server`: a real HTTP server with llama-server's CLI and API.

Run it the way the real binary is run (`--host`, `--port`, `-m`, `--parallel`, ...; unknown
arguments are ignored). Behaviour for tests comes from `--fake-*` flags or `FAKE_*` env vars
and can be flipped at runtime with `POST /fake/control`; `GET /fake/stats` tells what it saw.
Standalone on purpose: no project imports. See tests/fakes/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TRUE_WORDS = {"1", "true", "yes", "on"}

# name, type, default; each is `--fake-NAME` and env `FAKE_NAME` (upper, dashes to underscores)
FAKE_OPTIONS: tuple[tuple[str, type, Any], ...] = (
    ("token-rate", float, 200.0),  # tokens per second; <= 0 means instant
    ("tokens", int, 16),  # completion length when the request sets no max_tokens
    ("ttft", float, 0.0),  # extra seconds before the first token (prompt processing)
    ("load-time", float, 0.0),  # seconds /health answers 503 "Loading model"
    ("never-ready", bool, False),
    ("hang-after", int, None),  # completions after the Nth hang forever (no bytes)
    ("wedge-after", int, None),  # alias of hang-after (the canary case)
    ("hang-health", bool, False),  # /health never answers
    ("crash-mid-stream", int, None),  # the Nth streaming completion dies mid-stream (exit 1)
    ("stall-mid-stream", int, None),  # the Nth streaming completion stops sending, stays open
    ("crash-after-s", float, None),  # exit 1 after this many seconds
    ("ignore-sigterm", bool, False),
    ("fail-status", int, None),  # completions answer this HTTP status
    ("slot-count", int, None),  # slots actually served, overriding --parallel
    ("replica-id", str, None),  # shown in system_fingerprint and X-Fake-Replica; default: port
)

def log(message: str) -> None:
    """Write one log line to stderr, llama-server style."""
    print(message, file=sys.stderr, flush=True)


def env_default(name: str, kind: type, default: Any) -> Any:
    """The FAKE_* env value for an option, converted, or the default."""
    raw = os.environ.get("FAKE_" + name.upper().replace("-", "_"))
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in TRUE_WORDS
    return kind(raw)


class Parser:
    """argparse plus a table of known options, so unknown llama-server flags are skipped safely."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="llama-server", description="fake llama-server", allow_abbrev=False,
            add_help=True,
        )
        self.takes_value: dict[str, bool] = {"-h": False, "--help": False}

    def add(self, *names: str, flag: bool = False, env: str | None = None, **kw: Any) -> None:
        """Add an option; `env` names the LLAMA_ARG_* variable that supplies its default."""
        if env is not None and os.environ.get(env) not in (None, ""):
            raw = os.environ[env]
            kw["default"] = (raw.lower() in TRUE_WORDS) if flag else kw.get("type", str)(raw)
        if flag:
            kw.setdefault("default", False)
            self.parser.add_argument(*names, action="store_true", **kw)
        else:
            self.parser.add_argument(*names, **kw)
        for name in names:
            self.takes_value[name] = not flag

    def parse(self, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
        """Parse known options; return the rest untouched (so `-ctk q8_0` is not `-c tk`)."""
        known: list[str] = []
        unknown: list[str] = []
        i = 0
        while i < len(argv):
            token = argv[i]
            name = token.split("=", 1)[0] if token.startswith("--") else token
            if name not in self.takes_value:
                unknown.append(token)
                i += 1
                continue
            known.append(token)
            i += 1
            if self.takes_value[name] and "=" not in token and i < len(argv):
                known.append(argv[i])
                i += 1
        ns, rest = self.parser.parse_known_args(known)
        return ns, rest + unknown


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """llama-server's own options (the ones the fake uses) plus the --fake-* controls."""
    p = Parser()
    p.add("--host", default="127.0.0.1", env="LLAMA_ARG_HOST")
    p.add("--port", type=int, default=8080, env="LLAMA_ARG_PORT")
    p.add("-m", "--model", default=None, env="LLAMA_ARG_MODEL")
    p.add("-a", "--alias", default=None, env="LLAMA_ARG_ALIAS")
    p.add("-np", "--parallel", type=int, default=1, env="LLAMA_ARG_N_PARALLEL")
    p.add("-c", "--ctx-size", type=int, default=4096, env="LLAMA_ARG_CTX_SIZE")
    p.add("-t", "--threads", type=int, default=-1, env="LLAMA_ARG_THREADS")
    p.add("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", default=None,
          env="LLAMA_ARG_N_GPU_LAYERS")
    p.add("-sm", "--split-mode", default=None, env="LLAMA_ARG_SPLIT_MODE")
    p.add("-ts", "--tensor-split", default=None, env="LLAMA_ARG_TENSOR_SPLIT")
    p.add("-mg", "--main-gpu", type=int, default=None, env="LLAMA_ARG_MAIN_GPU")
    p.add("--api-key", default=None, env="LLAMA_API_KEY")
    p.add("--metrics", flag=True, env="LLAMA_ARG_ENDPOINT_METRICS")
    p.add("--slots", flag=True, env="LLAMA_ARG_ENDPOINT_SLOTS")
    p.add("--no-slots", flag=True)
    p.add("--no-webui", flag=True)
    p.add("--jinja", flag=True)
    p.add("--embedding", "--embeddings", dest="embeddings", flag=True)
    for name, kind, default in FAKE_OPTIONS:
        value = env_default(name, kind, default)
        if kind is bool:
            p.add(f"--fake-{name}", flag=True, default=value)
        else:
            p.add(f"--fake-{name}", type=kind, default=value)
    return p.parse(argv)


@dataclass
class Behaviour:
    """What the fake does now; flipped at runtime by POST /fake/control."""

    token_rate: float
    tokens: int
    ttft: float
    hang_after: int | None
    hang: bool = False
    hang_health: bool = False
    fail_status: int | None = None
    loading: bool = False


@dataclass
class Slot:
    """One parallel sequence, with the prompt it last held (the simulated prefix cache)."""

    id: int
    n_ctx: int
    prompt: str = ""
    busy: bool = False
    id_task: int = -1
    n_decoded: int = 0
    n_remain: int = 0


class SlotPool:
    """At most len(slots) generate at once; the rest wait in FIFO order (the deferred queue)."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.waiters: collections.deque[asyncio.Future[Slot]] = collections.deque()
        self.deferred_total = 0

    def pick(self, prompt: str) -> Slot | None:
        """The free slot sharing the longest prefix with the prompt (lowest id on ties)."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        return max(free, key=lambda s: (common_prefix(s.prompt, prompt), -s.id))

    async def take(self, prompt: str) -> Slot:
        """Wait for a slot and hold it."""
        if not self.waiters:
            slot = self.pick(prompt)
            if slot is not None:
                slot.busy = True
                return slot
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.deferred_total += 1
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give_back(fut.result())
            raise
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)

    def give_back(self, slot: Slot) -> None:
        """Release a slot, handing it straight to the oldest waiter if any."""
        slot.id_task = -1
        slot.n_remain = 0
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        slot.busy = False

    @property
    def deferred(self) -> int:
        return sum(1 for f in self.waiters if not f.done())


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def text_of(content: Any) -> str:
    """Message content as text (a string or OpenAI content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def count_tokens(text: str) -> int:
    """The fake tokenizer: four characters a token."""
    return len(text) // 4


def embedding_for(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit-ish vector for a text."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


def token_text(i: int) -> str:
    """The i-th generated piece: "tok0", " tok1", ..."""
    return f"tok{i}" if i == 0 else f" tok{i}"


class ApiError(Exception):
    """An error answered as llama-server's error JSON."""

    def __init__(self, status: int, message: str, type_: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.extra = extra

    def response(self) -> web.Response:
        body = {"error": {"code": self.status, "message": self.message, "type": self.type,
                          **self.extra}}
        return web.json_response(body, status=self.status)


def loading_error() -> ApiError:
    return ApiError(503, "Loading model", "unavailable_error")


class FakeLlamaServer:
    """The state and the HTTP handlers of one fake llama-server process."""

    def __init__(self, ns: argparse.Namespace, extra: list[str], argv: list[str]) -> None:
        self.ns = ns
        self.extra = extra
        self.argv = argv
        self.started = time.monotonic()
        self.port = ns.port
        self.replica_id: str = ns.fake_replica_id or ""
        hang_after = [v for v in (ns.fake_hang_after, ns.fake_wedge_after) if v is not None]
        self.b = Behaviour(
            token_rate=ns.fake_token_rate, tokens=ns.fake_tokens, ttft=ns.fake_ttft,
            hang_after=min(hang_after) if hang_after else None,
            hang_health=ns.fake_hang_health, fail_status=ns.fake_fail_status,
        )
        n_slots = ns.fake_slot_count if ns.fake_slot_count is not None else ns.parallel
        n_slots = max(1, n_slots)
        self.n_ctx_slot = max(1, ns.ctx_size // n_slots) if ns.ctx_size > 0 else 4096
        self.pool = SlotPool([Slot(i, self.n_ctx_slot) for i in range(n_slots)])
        model_path = ns.model or "model.gguf"
        self.model_id: str = ns.alias or Path(model_path).name
        # counters
        self.by_path: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[int] = collections.Counter()
        self.total_served = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.processing = 0
        self.max_concurrent = 0
        self.completions = 0
        self.streams = 0
        self.hung = 0
        self.wedged = 0  # generations wedged right now
        self.task_id = 0
        self.recent: collections.deque[Json] = collections.deque(maxlen=50)
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.tokens_predicted_total = 0
        self.prompt_seconds_total = 0.0
        self.predicted_seconds_total = 0.0
        self.n_decode_total = 0

    # ---- readiness -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if self.ns.fake_never_ready or self.b.loading:
            return False
        return bool(time.monotonic() - self.started >= self.ns.fake_load_time)

    @property
    def fingerprint(self) -> str:
        return f"b0-fake-{self.replica_id}"

    # ---- middleware ------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count, log, gate on loading and API key, turn ApiError into JSON."""
        path = request.path
        if path.startswith("/fake/"):
            return await handler(request)
        self.by_path[path] += 1
        status = 500
        try:
            if not self.ready and path not in ("/health", "/v1/health"):
                raise loading_error()
            if self.ns.api_key and path not in ("/health", "/v1/health", "/models",
                                                "/v1/models"):
                auth = request.headers.get("Authorization", "")
                if auth != f"Bearer {self.ns.api_key}":
                    raise ApiError(401, "Invalid API Key", "authentication_error")
            response = await handler(request)
            status = response.status
            response.headers.setdefault("X-Fake-Replica", self.replica_id)
            return response
        except ApiError as e:
            status = e.status
            resp = e.response()
            resp.headers["X-Fake-Replica"] = self.replica_id
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            self.total_served += 1
            self.by_status[status] += 1
            peer = request.remote or "-"
            log(f"srv  log_server_r: request: {request.method} {path} {peer} {status}")

    # ---- simple endpoints ------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.b.hang_health:
            await asyncio.get_running_loop().create_future()  # never answers
        if not self.ready:
            raise loading_error()
        return web.json_response({"status": "ok"})

    async def slots(self, request: web.Request) -> web.StreamResponse:
        if self.ns.no_slots:
            raise ApiError(501, "This server does not support slots endpoint. Start it with "
                           "`--slots`", "not_supported_error")
        await self.loop_task()
        return web.json_response([
            {
                "id": s.id, "id_task": s.id_task, "n_ctx": s.n_ctx, "speculative": False,
                "is_processing": s.busy,
                "params": {"n_predict": -1, "temperature": 0.8, "stream": True},
                "next_token": {"has_next_token": s.busy, "has_new_line": False,
                               "n_remain": s.n_remain, "n_decoded": s.n_decoded},
            }
            for s in self.pool.slots
        ])

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        if not self.ns.metrics:
            raise ApiError(501, "This server does not support metrics endpoint. Start it with "
                           "`--metrics`", "not_supported_error")
        await self.loop_task()
        busy = sum(1 for s in self.pool.slots if s.busy)
        prompt_tps = (self.prompt_tokens_total / self.prompt_seconds_total
                      if self.prompt_seconds_total else 0.0)
        pred_tps = (self.tokens_predicted_total / self.predicted_seconds_total
                    if self.predicted_seconds_total else 0.0)
        rows: list[tuple[str, str, str, float]] = [
            ("prompt_tokens_total", "counter", "Number of prompt tokens processed.",
             self.prompt_tokens_total),
            ("prompt_seconds_total", "counter", "Prompt process time",
             self.prompt_seconds_total),
            ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
             self.tokens_predicted_total),
            ("tokens_predicted_seconds_total", "counter", "Predict process time",
             self.predicted_seconds_total),
            ("n_decode_total", "counter", "Total number of llama_decode() calls",
             self.n_decode_total),
            ("n_busy_slots_per_decode", "counter", "Average number of busy slots per "
             "llama_decode() call", float(busy)),
            ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
             prompt_tps),
            ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
             pred_tps),
            ("requests_processing", "gauge", "Number of requests processing.", float(busy)),
            ("requests_deferred", "gauge", "Number of requests deferred.",
             float(self.pool.deferred)),
        ]
        lines: list[str] = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {kind}",
                      f"llamacpp:{name} {value:g}"]
        return web.Response(text="\n".join(lines) + "\n",
                            content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.StreamResponse:
        meta = {"n_ctx_train": 32768, "n_params": 268_000_000, "size": 253_000_000,
                "n_vocab": 262144, "n_embd": 640}
        return web.json_response({
            "object": "list",
            "data": [{"id": self.model_id, "object": "model", "created": int(time.time()),
                      "owned_by": "llamacpp", "meta": meta}],
            "models": [{"name": self.model_id, "model": self.model_id, "type": "model",
                        "capabilities": ["completion"]}],
        })

    async def props(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({
            "default_generation_settings": {"n_ctx": self.n_ctx_slot},
            "total_slots": len(self.pool.slots),
            "model_path": self.ns.model or "",
            "model_alias": self.model_id,
            "build_info": "b0-fake",
        })

    # ---- fake control ----------------------------------------------------------------------

    async def fake_stats(self, request: web.Request) -> web.StreamResponse:
        last = self.recent[-1] if self.recent else None
        return web.json_response({
            "replica": self.replica_id, "pid": os.getpid(), "port": self.port,
            "ready": self.ready, "uptime_s": time.monotonic() - self.started,
            "requests": dict(self.by_path), "statuses": {str(k): v for k, v in
                                                         self.by_status.items()},
            "total": self.total_served,
            "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
            "processing": self.processing, "max_concurrent": self.max_concurrent,
            "completions": self.completions, "streams": self.streams, "hung": self.hung,
            "deferred": self.pool.deferred, "deferred_total": self.pool.deferred_total,
            "slots": len(self.pool.slots), "n_ctx_slot": self.n_ctx_slot,
            "tokens": {"prompt": self.prompt_tokens_total, "cached": self.cached_tokens_total,
                       "predicted": self.tokens_predicted_total},
            "last_model": last["model"] if last else None,
            "last_keys": last["keys"] if last else None,
            "recent": list(self.recent),
            "behaviour": self.b.__dict__,
            "config": {
                "model": self.ns.model, "alias": self.ns.alias, "model_id": self.model_id,
                "host": self.ns.host, "parallel": self.ns.parallel, "ctx_size": self.ns.ctx_size,
                "threads": self.ns.threads, "n_gpu_layers": self.ns.n_gpu_layers,
                "split_mode": self.ns.split_mode, "tensor_split": self.ns.tensor_split,
                "main_gpu": self.ns.main_gpu, "metrics": self.ns.metrics,
                "api_key": bool(self.ns.api_key),
            },
            "argv": self.argv, "ignored_args": self.extra,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("CUDA_", "FAKE_", "LLAMA_", "GGML_", "OMP_"))},
        })

    async def fake_control(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "control body must be JSON", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise ApiError(400, "control body must be an object", "invalid_request_error")
        for key in ("hang", "hang_health", "loading"):
            if key in body:
                setattr(self.b, key, bool(body[key]))
        if "ready" in body:
            self.b.loading = not bool(body["ready"])
        if "fail_status" in body:
            self.b.fail_status = int(body["fail_status"]) if body["fail_status"] else None
        if "hang_after" in body:
            self.b.hang_after = None if body["hang_after"] is None else int(body["hang_after"])
        for key, kind in (("token_rate", float), ("tokens", int), ("ttft", float)):
            if key in body:
                setattr(self.b, key, kind(body[key]))
        if body.get("crash"):
            code = body["crash"] if isinstance(body["crash"], int) and body["crash"] > 1 else 1
            asyncio.get_running_loop().call_later(0.05, crash, code, "control")
        log(f"fake: control {json.dumps(body, sort_keys=True)}")
        return web.json_response({"ok": True, "behaviour": self.b.__dict__})

    # ---- completions -----------------------------------------------------------------------

    async def read_json(self, request: web.Request) -> Json:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"Failed to parse JSON: {e}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request_error")
        return body

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, "chat")

    async def oai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, "text")

    async def native_completion(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, "native")

    def render(self, kind: str, body: Json) -> str:
        """The prompt as one string (what the prefix cache compares)."""
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' is required and must be a non-empty array",
                               "invalid_request_error")
            return "".join(f"<|{m.get('role', 'user')}|>{text_of(m.get('content'))}\n"
                           for m in messages if isinstance(m, dict))
        prompt = body.get("prompt", body.get("content"))
        if prompt is None:
            raise ApiError(400, "\"prompt\" must be provided", "invalid_request_error")
        if isinstance(prompt, list):
            return " ".join(str(p) for p in prompt)
        return str(prompt)

    def n_predict(self, kind: str, body: Json) -> tuple[int, bool]:
        """Tokens to generate, and whether a limit from the request applies."""
        keys = ("n_predict", "max_tokens") if kind == "native" else (
            "max_completion_tokens", "max_tokens", "n_predict")
        for key in keys:
            value = body.get(key)
            if isinstance(value, int) and value >= 0:
                return value, True
        return max(0, self.b.tokens), False

    async def pause(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def wedge(self) -> None:
        """Hang forever, the way a wedged generation loop does."""
        self.hung += 1
        self.wedged += 1
        log("fake: generation wedged")
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.wedged -= 1

    async def loop_task(self) -> None:
        """llama-server serves /slots and /metrics from its generation loop: a wedged
        generation leaves them unanswered (while /health, served apart, still answers)."""
        if self.wedged or self.b.hang:
            await asyncio.get_running_loop().create_future()

    async def complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._complete(request, kind)
        finally:
            self.in_flight -= 1

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await self.read_json(request)
        self.recent.append({"path": request.path, "model": body.get("model"),
                            "keys": sorted(body), "stream": bool(body.get("stream"))})
        self.completions += 1
        number = self.completions
        stream = bool(body.get("stream"))
        if self.b.fail_status:
            raise ApiError(self.b.fail_status, "fake failure", "server_error")
        if self.b.hang or (self.b.hang_after is not None and number > self.b.hang_after):
            await self.wedge()
        prompt = self.render(kind, body)
        n_prompt = max(1, count_tokens(prompt))
        if n_prompt > self.n_ctx_slot:
            raise ApiError(400, "the request exceeds the available context size, try "
                           "increasing it", "exceed_context_size_error",
                           n_prompt_tokens=n_prompt, n_ctx=self.n_ctx_slot)
        n_gen, limited = self.n_predict(kind, body)
        crash_at = stall_at = None
        if stream:
            self.streams += 1
            if self.ns.fake_crash_mid_stream == self.streams:
                crash_at = min(2, max(n_gen - 1, 0))
            if self.ns.fake_stall_mid_stream == self.streams:
                stall_at = min(2, max(n_gen - 1, 0))
        slot = await self.pool.take(prompt)
        self.task_id += 1
        slot.id_task = self.task_id
        slot.n_decoded = 0
        slot.n_remain = n_gen
        self.processing += 1
        self.max_concurrent = max(self.max_concurrent, self.processing)
        try:
            cached = min(common_prefix(slot.prompt, prompt) // 4, n_prompt - 1)
            slot.prompt = prompt
            gen = Generation(self, kind, body, slot, n_prompt, cached, n_gen, limited)
            if stream:
                return await gen.stream(request, crash_at, stall_at)
            return await gen.whole()
        finally:
            self.processing -= 1
            self.pool.give_back(slot)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        self.recent.append({"path": request.path, "model": body.get("model"),
                            "keys": sorted(body), "stream": False})
        if self.b.fail_status:
            raise ApiError(self.b.fail_status, "fake failure", "server_error")
        inputs = body.get("input", body.get("content"))
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "\"input\" must be a string or a non-empty array",
                           "invalid_request_error")
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        n_prompt = sum(max(1, count_tokens(t)) for t in texts)
        self.prompt_tokens_total += n_prompt
        return web.json_response({
            "model": body.get("model") or self.model_id, "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": embedding_for(t)}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt},
        })


class Generation:
    """One completion being produced on a slot: the timed token stream and the response shapes."""

    def __init__(self, srv: FakeLlamaServer, kind: str, body: Json, slot: Slot, n_prompt: int,
                 cached: int, n_gen: int, limited: bool) -> None:
        self.srv = srv
        self.kind = kind
        self.body = body
        self.slot = slot
        self.n_prompt = n_prompt
        self.cached = cached
        self.n_gen = n_gen
        self.limited = limited
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = str(body.get("model") or srv.model_id)
        self.t_start = time.monotonic()
        self.t_first = self.t_start
        self.produced = 0

    @property
    def finish_reason(self) -> str:
        return "length" if self.limited else "stop"

    async def tokens(self, stall_at: int | None = None) -> AsyncIterator[str]:
        """Yield the pieces at the token rate (read live, so control changes apply)."""
        srv = self.srv
        await srv.pause(srv.b.ttft)
        self.t_first = time.monotonic()
        next_at = self.t_first
        for i in range(self.n_gen):
            if srv.b.hang or (stall_at is not None and i == stall_at):
                await srv.wedge()
            rate = srv.b.token_rate
            if rate > 0:
                next_at += 1.0 / rate
                await srv.pause(next_at - time.monotonic())
            else:
                next_at = time.monotonic()
            self.produced += 1
            self.slot.n_decoded = self.produced
            self.slot.n_remain = self.n_gen - self.produced
            srv.n_decode_total += 1
            yield token_text(i)

    def account(self) -> None:
        """Add this generation to the server's counters (once, at the end)."""
        srv = self.srv
        srv.prompt_tokens_total += self.n_prompt - self.cached
        srv.cached_tokens_total += self.cached
        srv.tokens_predicted_total += self.produced
        srv.prompt_seconds_total += self.t_first - self.t_start
        srv.predicted_seconds_total += time.monotonic() - self.t_first

    def timings(self) -> Json:
        prompt_ms = max((self.t_first - self.t_start) * 1000, 0.001)
        predicted_ms = max((time.monotonic() - self.t_first) * 1000, 0.001)
        prompt_n = self.n_prompt - self.cached
        return {
            "cache_n": self.cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
            "prompt_per_second": prompt_n / prompt_ms * 1000,
            "predicted_n": self.produced, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(self.produced, 1),
            "predicted_per_second": self.produced / predicted_ms * 1000,
        }

    def usage(self) -> Json:
        return {"completion_tokens": self.produced, "prompt_tokens": self.n_prompt,
                "total_tokens": self.n_prompt + self.produced,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    def envelope(self, obj: str) -> Json:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.srv.fingerprint}

    def native(self, content: str, stop: bool) -> Json:
        out: Json = {"index": 0, "content": content, "tokens": [], "id_slot": self.slot.id,
                     "stop": stop, "model": self.model, "tokens_predicted": self.produced,
                     "tokens_evaluated": self.n_prompt}
        if stop:
            out.update({"stop_type": "limit" if self.limited else "eos", "stopping_word": "",
                        "tokens_cached": self.n_prompt + self.produced, "truncated": False,
                        "has_new_line": False, "timings": self.timings(),
                        "generation_settings": {"n_predict": self.n_gen}})
        return out

    async def whole(self) -> web.StreamResponse:
        text = "".join([piece async for piece in self.tokens()])
        self.account()
        if self.kind == "native":
            return web.json_response(self.native(text, True))
        if self.kind == "chat":
            choice: Json = {"index": 0, "finish_reason": self.finish_reason,
                            "message": {"role": "assistant", "content": text}}
            out = self.envelope("chat.completion")
        else:
            choice = {"index": 0, "finish_reason": self.finish_reason, "text": text,
                      "logprobs": None}
            out = self.envelope("text_completion")
        out.update({"choices": [choice], "usage": self.usage(), "timings": self.timings()})
        return web.json_response(out)

    def chunk(self, content: str | None, finish: str | None, first: bool = False) -> Json:
        if self.kind == "chat":
            delta: Json = {}
            if first:
                delta = {"role": "assistant", "content": None}
            elif content is not None:
                delta = {"content": content}
            choice: Json = {"index": 0, "finish_reason": finish, "delta": delta}
            out = self.envelope("chat.completion.chunk")
        else:
            choice = {"index": 0, "finish_reason": finish, "text": content or "",
                      "logprobs": None}
            out = self.envelope("text_completion")
        out["choices"] = [choice]
        return out

    async def stream(self, request: web.Request, crash_at: int | None,
                     stall_at: int | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Fake-Replica": self.srv.replica_id})
        await resp.prepare(request)

        async def send(obj: Json | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await resp.write(f"data: {data}\n\n".encode())

        if self.kind == "chat":
            await send(self.chunk(None, None, first=True))
        i = 0
        async for piece in self.tokens(stall_at):
            if self.kind == "native":
                await send(self.native(piece, False))
            else:
                await send(self.chunk(piece, None))
            i += 1
            if crash_at is not None and i >= crash_at:
                await asyncio.sleep(0.05)
                crash(1, "mid-stream")
        if crash_at is not None:  # a zero-token stream still crashes
            await asyncio.sleep(0.05)
            crash(1, "mid-stream")
        self.account()
        if self.kind == "native":
            await send(self.native("", True))
        else:
            final = self.chunk(None, self.finish_reason)
            final["timings"] = self.timings()
            await send(final)
            options = self.body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                usage = self.envelope(final["object"])
                usage.update({"choices": [], "usage": self.usage(), "timings": self.timings()})
                await send(usage)
            await send("[DONE]")
        await resp.write_eof()
        return resp


def crash(code: int, why: str) -> None:
    """Die at once, like a segfaulting engine (no cleanup, no flush of responses)."""
    log(f"fake: crashing ({why}), exit {code}")
    os._exit(code)


def build_app(srv: FakeLlamaServer) -> web.Application:
    app = web.Application(middlewares=[srv.middleware], client_max_size=64 * 1024 * 1024)
    r = app.router
    for path in ("/health", "/v1/health"):
        r.add_get(path, srv.health)
    r.add_get("/slots", srv.slots)
    r.add_get("/metrics", srv.metrics)
    r.add_get("/props", srv.props)
    for path in ("/models", "/v1/models"):
        r.add_get(path, srv.models)
    for path in ("/chat/completions", "/v1/chat/completions"):
        r.add_post(path, srv.chat_completions)
    r.add_post("/v1/completions", srv.oai_completions)
    for path in ("/completion", "/completions"):
        r.add_post(path, srv.native_completion)
    for path in ("/embedding", "/embeddings", "/v1/embeddings"):
        r.add_post(path, srv.embeddings)
    r.add_get("/fake/stats", srv.fake_stats)
    r.add_post("/fake/control", srv.fake_control)
    return app


async def serve(ns: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """Listen, answer until SIGTERM/SIGINT, exit 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        if signame == "SIGTERM" and ns.fake_ignore_sigterm:
            log("fake: ignoring SIGTERM")
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    srv = FakeLlamaServer(ns, extra, argv)
    runner = web.AppRunner(build_app(srv), access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, ns.host, ns.port)
    await site.start()
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            srv.port = int(address[1])
            break
    srv.replica_id = srv.replica_id or str(srv.port)
    log(f"main: HTTP server is listening, hostname: {ns.host}, port: {srv.port}, "
        f"http threads: {len(srv.pool.slots)}")
    log("main: loading model")
    if ns.fake_crash_after_s is not None:
        loop.call_later(ns.fake_crash_after_s, crash, 1, "crash-after-s")
    if not ns.fake_never_ready:
        loop.call_later(ns.fake_load_time, log, "main: model loaded")
    log(f"main: server is listening on http://{ns.host}:{srv.port} - starting the main loop")
    await stop.wait()
    log("srv    operator(): operator(): cleaning up before exit...")
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=1.0)
    except TimeoutError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns, extra = parse_args(argv)
    if ns.fake_ignore_sigterm:  # before the loop exists, so an early SIGTERM is ignored too
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log(f"build: 0 (fake) with python {sys.version.split()[0]}")
    log(f"system info: n_threads = {ns.threads}, model = {ns.model}, n_parallel = {ns.parallel}, "
        f"n_ctx = {ns.ctx_size}, CUDA_VISIBLE_DEVICES = {os.environ.get('CUDA_VISIBLE_DEVICES')}")
    return asyncio.run(serve(ns, extra, argv))


if __name__ == "__main__":
    sys.exit(main())
