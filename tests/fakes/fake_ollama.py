#!/usr/bin/env python3
"""A fake `ollama serve`: a real HTTP server speaking Ollama's documented API.

Run as `python fake_ollama.py serve`. Configured like Ollama through OLLAMA_HOST,
OLLAMA_MODELS, OLLAMA_KEEP_ALIVE, OLLAMA_MAX_LOADED_MODELS, OLLAMA_NUM_PARALLEL,
OLLAMA_CONTEXT_LENGTH, OLLAMA_MAX_QUEUE; test behaviour through `--fake-*` flags or `FAKE_*`
env vars, `POST /fake/control` and `GET /fake/stats`. Standalone: no project imports.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import hashlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

VERSION = "0.12.6"
TRUE_WORDS = {"1", "true", "yes", "on"}
FOREVER = float("inf")
MODEL_SIZE = 256 * 1024 * 1024

FAKE_OPTIONS: tuple[tuple[str, type, Any], ...] = (
    ("token-rate", float, 200.0),  # tokens per second; <= 0 means instant
    ("tokens", int, 16),  # completion length when the request sets none
    ("load-time", float, 0.0),  # seconds a model takes to load
    ("models", str, ""),  # comma-separated models that exist at start
    ("hang-after", int, None),  # generation requests after the Nth hang forever
    ("hang-health", bool, False),  # GET / never answers
    ("crash-mid-stream", int, None),  # the Nth streaming generation dies mid-stream (exit 1)
    ("crash-after-s", float, None),
    ("ignore-sigterm", bool, False),
    ("fail-status", int, None),  # generation requests answer this HTTP status
    ("replica-id", str, None),  # X-Fake-Replica header and system_fingerprint; default: port
)


def log(level: str, message: str) -> None:
    """One log line on stderr in Ollama's logfmt style."""
    now = dt.datetime.now().astimezone().isoformat(timespec="milliseconds")
    print(f'time={now} level={level} source=fake_ollama.py msg="{message}"', file=sys.stderr,
          flush=True)


def env_value(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if kind is bool:
        return raw.strip().lower() in TRUE_WORDS
    return kind(raw)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ollama", description="fake ollama", allow_abbrev=False)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"])
    for name, kind, default in FAKE_OPTIONS:
        value = env_value("FAKE_" + name.upper().replace("-", "_"), kind, default)
        if kind is bool:
            parser.add_argument(f"--fake-{name}", action="store_true", default=value)
        else:
            parser.add_argument(f"--fake-{name}", type=kind, default=value)
    ns, _ = parser.parse_known_args(argv)
    return ns


def parse_host(raw: str | None) -> tuple[str, int]:
    """OLLAMA_HOST as `ollama serve` reads it: [scheme://]host[:port], default 127.0.0.1:11434."""
    value = (raw or "").strip()
    value = re.sub(r"^[a-z]+://", "", value).rstrip("/")
    if not value:
        return "127.0.0.1", 11434
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 11434
    return (host.strip("[]") or "127.0.0.1"), int(port)


DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """keep_alive as seconds: a number of seconds or a Go duration; negative means forever."""
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"invalid duration {text!r}") from None
            seconds = sign * sum(float(n) * UNITS[u] for n, u in parts)
    return FOREVER if seconds < 0 else seconds


def full_name(name: str) -> str:
    """`gemma` -> `gemma:latest`, the way Ollama names models."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def iso(ts: float) -> str:
    """A wall-clock time as RFC 3339 with the local offset, as Ollama prints it."""
    if ts == FOREVER:
        # Ollama's "forever" is now + the largest Go duration (about 292 years)
        return (dt.datetime.now().astimezone() + dt.timedelta(days=292 * 365)).isoformat()
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat()


def count_tokens(text: str) -> int:
    return len(text) // 4


def embedding_for(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


def token_text(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def crash(code: int, why: str) -> None:
    log("ERROR", f"fake: crashing ({why}), exit {code}")
    os._exit(code)


class ApiError(Exception):
    """An error answered as Ollama does: {"error": "..."} (or OpenAI's shape under /v1)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self, openai: bool) -> web.Response:
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(self.status,
                                                                           "api_error")
            body: Json = {"error": {"message": self.message, "type": kind, "param": None,
                                    "code": None}}
        else:
            body = {"error": self.message}
        return web.json_response(body, status=self.status)


def not_found(name: str) -> ApiError:
    return ApiError(404, f'model "{name}" not found, try pulling it first')


@dataclass
class ModelInfo:
    """A model known to the server (created, pulled, or found in OLLAMA_MODELS)."""

    name: str
    from_: str = ""
    parameters: Json = field(default_factory=dict)
    template: str = ""
    system: str = ""
    modified: float = field(default_factory=time.time)
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> Json:
        return {"parent_model": "", "format": "gguf", "family": "gemma3",
                "families": ["gemma3"], "parameter_size": "268.10M",
                "quantization_level": "Q4_K_M"}

    def to_json(self) -> Json:
        return {"name": self.name, "from": self.from_, "parameters": self.parameters,
                "template": self.template, "system": self.system, "modified": self.modified}


@dataclass
class Loaded:
    """A model resident in (fake) memory."""

    name: str
    num_ctx: int
    expires: float  # wall time, FOREVER, or 0 while requests run
    keep_alive: float
    last_used: float
    refs: int = 0
    sem: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


@dataclass
class Behaviour:
    token_rate: float
    tokens: int
    load_time: float
    hang_after: int | None
    hang: bool = False
    hang_health: bool = False
    fail_status: int | None = None


class FakeOllama:
    """State and handlers of one fake `ollama serve`."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.host, self.port = parse_host(os.environ.get("OLLAMA_HOST"))
        self.replica_id: str = ns.fake_replica_id or ""
        self.keep_alive_default = parse_keep_alive(os.environ.get("OLLAMA_KEEP_ALIVE") or "5m")
        self.max_loaded = max(1, env_value("OLLAMA_MAX_LOADED_MODELS", int, 3))
        self.num_parallel = max(1, env_value("OLLAMA_NUM_PARALLEL", int, 1))
        self.default_ctx = env_value("OLLAMA_CONTEXT_LENGTH", int, 4096)
        self.max_queue = env_value("OLLAMA_MAX_QUEUE", int, 512)
        models_dir = os.environ.get("OLLAMA_MODELS")
        self.models_dir = Path(models_dir) if models_dir else None
        self.b = Behaviour(token_rate=ns.fake_token_rate, tokens=ns.fake_tokens,
                           load_time=ns.fake_load_time, hang_after=ns.fake_hang_after,
                           hang_health=ns.fake_hang_health, fail_status=ns.fake_fail_status)
        self.known: dict[str, ModelInfo] = {}
        self.loaded: dict[str, Loaded] = {}
        self.load_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.blobs: set[str] = set()
        # counters
        self.by_path: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.processing = 0
        self.max_concurrent = 0
        self.waiting = 0
        self.generations = 0
        self.streams = 0
        self.hung = 0
        self.loads = 0
        self.reloads = 0
        self.unloads = 0
        self.evictions = 0
        self.expirations = 0
        self.events: collections.deque[Json] = collections.deque(maxlen=100)
        self.recent: collections.deque[Json] = collections.deque(maxlen=50)
        self.prompt_tokens_total = 0
        self.tokens_predicted_total = 0
        for name in filter(None, (n.strip() for n in ns.fake_models.split(","))):
            self.known[full_name(name)] = ModelInfo(full_name(name), from_=name)
        self.scan_store()

    @property
    def fingerprint(self) -> str:
        return f"fp_ollama-{self.replica_id}"

    # ---- the model store (OLLAMA_MODELS) ---------------------------------------------------

    def manifest_path(self, name: str) -> Path | None:
        if self.models_dir is None:
            return None
        model, _, tag = name.rpartition(":")
        parts = model.split("/")
        if len(parts) == 1:
            parts = ["registry.ollama.ai", "library", *parts]
        elif len(parts) == 2:
            parts = ["registry.ollama.ai", *parts]
        return self.models_dir.joinpath("manifests", *parts, tag)

    def scan_store(self) -> None:
        """Know the models whose manifests are in OLLAMA_MODELS (real or written by a fake)."""
        if self.models_dir is None:
            return
        root = self.models_dir / "manifests"
        if not root.is_dir():
            return
        for path in root.glob("*/*/*/*"):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(root).parts
            prefix = "" if (host, namespace) == ("registry.ollama.ai", "library") else (
                f"{namespace}/" if host == "registry.ollama.ai" else f"{host}/{namespace}/")
            name = f"{prefix}{model}:{tag}"
            info = ModelInfo(name, modified=path.stat().st_mtime)
            try:
                fake = json.loads(path.read_text()).get("fake")
            except (OSError, ValueError, AttributeError):
                fake = None
            if isinstance(fake, dict):
                info.from_ = str(fake.get("from", ""))
                info.parameters = dict(fake.get("parameters") or {})
                info.template = str(fake.get("template", ""))
                info.system = str(fake.get("system", ""))
            self.known[name] = info

    def save(self, info: ModelInfo) -> None:
        path = self.manifest_path(info.name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": f"sha256:{info.digest}", "size": 0},
            "layers": [],
            "fake": info.to_json(),
        }
        path.write_text(json.dumps(manifest))

    def forget(self, name: str) -> None:
        path = self.manifest_path(name)
        if path is not None and path.exists():
            path.unlink()

    # ---- residency -------------------------------------------------------------------------

    def event(self, kind: str, name: str, **extra: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, "model": name, **extra})
        log("INFO", f"{kind} model={name} " + " ".join(f"{k}={v}" for k, v in extra.items()))

    def expire(self) -> None:
        """Unload models whose keep_alive ran out (Ollama does this on a timer)."""
        now = time.time()
        for name, m in list(self.loaded.items()):
            if m.refs == 0 and m.expires != FOREVER and m.expires <= now:
                del self.loaded[name]
                self.expirations += 1
                self.event("expired", name)

    def lookup(self, raw: Any) -> ModelInfo:
        if not isinstance(raw, str) or not raw:
            raise ApiError(400, "model is required")
        info = self.known.get(full_name(raw))
        if info is None:
            raise not_found(raw)
        return info

    def wanted_ctx(self, info: ModelInfo, options: Any) -> int:
        if isinstance(options, dict) and isinstance(options.get("num_ctx"), int):
            return int(options["num_ctx"])
        try:
            return int(info.parameters["num_ctx"])
        except (KeyError, TypeError, ValueError):
            return int(self.default_ctx)

    async def ensure_loaded(self, info: ModelInfo, options: Any) -> tuple[Loaded, float]:
        """Load (or reload for a new num_ctx) a model, evicting the LRU one past the limit."""
        self.expire()
        num_ctx = self.wanted_ctx(info, options)
        t0 = time.monotonic()
        async with self.load_locks[info.name]:
            current = self.loaded.get(info.name)
            if current is not None and current.num_ctx == num_ctx:
                return current, 0.0
            if current is not None:
                self.reloads += 1
                self.event("reload", info.name, old_num_ctx=current.num_ctx, num_ctx=num_ctx)
                del self.loaded[info.name]
            while len(self.loaded) >= self.max_loaded:
                victims = sorted(self.loaded.values(), key=lambda m: (m.refs > 0, m.last_used))
                victim = victims[0]
                del self.loaded[victim.name]
                self.evictions += 1
                self.event("evicted", victim.name, reason="max_loaded_models")
            if self.b.load_time > 0:
                await asyncio.sleep(self.b.load_time)
            self.loads += 1
            entry = Loaded(info.name, num_ctx, expires=FOREVER, keep_alive=FOREVER,
                           last_used=time.time(), sem=asyncio.Semaphore(self.num_parallel))
            self.loaded[info.name] = entry
            self.event("loaded", info.name, num_ctx=num_ctx)
            return entry, time.monotonic() - t0

    def release(self, entry: Loaded, keep_alive: Any) -> None:
        """A request ends: set the model's expiry from its keep_alive (0 unloads now)."""
        seconds = self.keep_alive_of(keep_alive)
        entry.refs -= 1
        entry.last_used = time.time()
        entry.keep_alive = seconds
        entry.expires = FOREVER if seconds == FOREVER else time.time() + seconds
        if seconds == 0 and entry.refs == 0 and self.loaded.get(entry.name) is entry:
            del self.loaded[entry.name]
            self.unloads += 1
            self.event("unloaded", entry.name, reason="keep_alive 0")

    def keep_alive_of(self, value: Any) -> float:
        if value is None:
            return self.keep_alive_default
        try:
            return parse_keep_alive(value)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    # ---- middleware ------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/fake/"):
            return await handler(request)
        self.by_path[path] += 1
        status = 500
        t0 = time.monotonic()
        try:
            response = await handler(request)
            status = response.status
            response.headers.setdefault("X-Fake-Replica", self.replica_id)
            return response
        except ApiError as e:
            status = e.status
            resp = e.response(openai=path.startswith("/v1/"))
            resp.headers["X-Fake-Replica"] = self.replica_id
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.total += 1
            took = time.monotonic() - t0
            print(f"[GIN] {time.strftime('%Y/%m/%d - %H:%M:%S')} | {status:3d} | "
                  f"{took * 1000:10.3f}ms | {request.remote or '-':>15} | "
                  f"{request.method:<7} \"{path}\"", file=sys.stderr, flush=True)

    async def read_json(self, request: web.Request) -> Json:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"invalid character in JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    # ---- basics ----------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        if self.b.hang_health:
            await asyncio.get_running_loop().create_future()
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": VERSION})

    def tag_entry(self, info: ModelInfo) -> Json:
        return {"name": info.name, "model": info.name, "modified_at": iso(info.modified),
                "size": MODEL_SIZE, "digest": info.digest, "details": info.details()}

    async def tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"models": [self.tag_entry(i) for i in self.known.values()]})

    async def ps(self, request: web.Request) -> web.StreamResponse:
        self.expire()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", "-1")
        models = []
        for m in self.loaded.values():
            info = self.known.get(m.name) or ModelInfo(m.name)
            expires = FOREVER if m.refs else m.expires
            models.append({"name": m.name, "model": m.name, "size": MODEL_SIZE,
                           "digest": info.digest, "details": info.details(),
                           "expires_at": iso(expires), "size_vram": MODEL_SIZE if gpu else 0,
                           "context_length": m.num_ctx})
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        info = self.lookup(body.get("model") or body.get("name"))
        params = "\n".join(f"{k:<30} {v}" for k, v in info.parameters.items())
        modelfile = (f"# Modelfile generated by \"ollama show\"\nFROM {info.from_ or info.name}\n"
                     + (f'TEMPLATE """{info.template}"""\n' if info.template else "")
                     + (f'SYSTEM """{info.system}"""\n' if info.system else "")
                     + "".join(f"PARAMETER {k} {v}\n" for k, v in info.parameters.items()))
        out: Json = {"modelfile": modelfile, "parameters": params, "template": info.template,
                     "details": info.details(), "modified_at": iso(info.modified),
                     "capabilities": ["completion"],
                     "model_info": {"general.architecture": "gemma3",
                                    "general.parameter_count": 268098176,
                                    "gemma3.context_length": 32768}}
        if info.system:
            out["system"] = info.system
        return web.json_response(out)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        from_ = body.get("from")
        files = body.get("files")
        if not from_ and not files:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        statuses: list[Json] = []
        info = ModelInfo(full_name(name), from_=str(from_ or ""))
        if isinstance(from_, str) and from_:
            base = self.known.get(full_name(from_))
            if base is not None:
                info.parameters = dict(base.parameters)
                info.template = base.template
                info.system = base.system
                statuses.append({"status": f"using existing layer sha256:{base.digest}"})
        if isinstance(files, dict):
            for fname, digest in files.items():
                hexdigest = str(digest).removeprefix("sha256:")
                if hexdigest not in self.blobs and not self.blob_on_disk(hexdigest):
                    raise ApiError(400, f"blob for {fname} ({digest}) not found; upload it first")
                statuses.append({"status": f"using existing layer sha256:{hexdigest}"})
        if isinstance(body.get("parameters"), dict):
            info.parameters.update(body["parameters"])
            statuses.append({"status": "creating new layer sha256:"
                             + hashlib.sha256(json.dumps(info.parameters).encode()).hexdigest()})
        for key in ("template", "system"):
            if isinstance(body.get(key), str):
                setattr(info, key, body[key])
        info.digest = hashlib.sha256(json.dumps(info.to_json() | {"modified": 0},
                                                sort_keys=True).encode()).hexdigest()
        self.known[info.name] = info
        self.save(info)
        statuses += [{"status": "writing manifest"}, {"status": "success"}]
        self.event("created", info.name, source=info.from_)
        return await self.status_stream(request, statuses, body.get("stream", True))

    async def status_stream(self, request: web.Request, statuses: list[Json],
                            stream: Any) -> web.StreamResponse:
        if stream is False:
            return web.json_response(statuses[-1])
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for s in statuses:
            await resp.write((json.dumps(s) + "\n").encode())
        await resp.write_eof()
        return resp

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        info = self.known.get(full_name(name))
        if info is None:
            info = ModelInfo(full_name(name), from_=name)
            self.known[info.name] = info
            self.save(info)
        statuses: list[Json] = [{"status": "pulling manifest"},
                    {"status": f"pulling {info.digest[:12]}", "digest": f"sha256:{info.digest}",
                     "total": MODEL_SIZE, "completed": MODEL_SIZE},
                    {"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                    {"status": "success"}]
        return await self.status_stream(request, statuses, body.get("stream", True))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        info = self.lookup(body.get("model") or body.get("name"))
        del self.known[info.name]
        self.loaded.pop(info.name, None)
        self.forget(info.name)
        return web.Response()

    async def copy(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        info = self.lookup(body.get("source"))
        dest = body.get("destination")
        if not isinstance(dest, str) or not dest:
            raise ApiError(400, "destination is required")
        clone = ModelInfo(full_name(dest), from_=info.from_, parameters=dict(info.parameters),
                          template=info.template, system=info.system, digest=info.digest)
        self.known[clone.name] = clone
        self.save(clone)
        return web.Response()

    def blob_on_disk(self, hexdigest: str) -> bool:
        return bool(self.models_dir and (self.models_dir / "blobs" / f"sha256-{hexdigest}")
                    .exists())

    async def blob_head(self, request: web.Request) -> web.StreamResponse:
        hexdigest = request.match_info["digest"].removeprefix("sha256:").removeprefix("sha256-")
        ok = hexdigest in self.blobs or self.blob_on_disk(hexdigest)
        return web.Response(status=200 if ok else 404)

    async def blob_post(self, request: web.Request) -> web.StreamResponse:
        hexdigest = request.match_info["digest"].removeprefix("sha256:").removeprefix("sha256-")
        h = hashlib.sha256()
        async for chunk in request.content.iter_chunked(1 << 20):
            h.update(chunk)
        if h.hexdigest() != hexdigest:
            raise ApiError(400, "digest mismatch")
        self.blobs.add(hexdigest)
        return web.Response(status=201)

    # ---- fake control ----------------------------------------------------------------------

    async def fake_stats(self, request: web.Request) -> web.StreamResponse:
        self.expire()
        last = self.recent[-1] if self.recent else None
        return web.json_response({
            "replica": self.replica_id, "pid": os.getpid(), "port": self.port,
            "requests": dict(self.by_path), "total": self.total,
            "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
            "processing": self.processing, "max_concurrent": self.max_concurrent,
            "waiting": self.waiting, "generations": self.generations, "streams": self.streams,
            "hung": self.hung, "loads": self.loads, "reloads": self.reloads,
            "unloads": self.unloads, "evictions": self.evictions,
            "expirations": self.expirations,
            "known": sorted(self.known), "loaded": {
                m.name: {"num_ctx": m.num_ctx, "refs": m.refs,
                         "keep_alive": None if m.keep_alive == FOREVER else m.keep_alive}
                for m in self.loaded.values()},
            "events": list(self.events),
            "tokens": {"prompt": self.prompt_tokens_total,
                       "predicted": self.tokens_predicted_total},
            "last_model": last["model"] if last else None,
            "last_keys": last["keys"] if last else None, "recent": list(self.recent),
            "behaviour": self.b.__dict__,
            "config": {"host": self.host, "keep_alive": None if self.keep_alive_default ==
                       FOREVER else self.keep_alive_default,
                       "max_loaded_models": self.max_loaded, "num_parallel": self.num_parallel,
                       "context_length": self.default_ctx,
                       "models": str(self.models_dir) if self.models_dir else None},
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("CUDA_", "FAKE_", "OLLAMA_"))},
        })

    async def fake_control(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "control body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "control body must be an object")
        for key in ("hang", "hang_health"):
            if key in body:
                setattr(self.b, key, bool(body[key]))
        if "fail_status" in body:
            self.b.fail_status = int(body["fail_status"]) if body["fail_status"] else None
        if "hang_after" in body:
            self.b.hang_after = None if body["hang_after"] is None else int(body["hang_after"])
        for key, kind in (("token_rate", float), ("tokens", int), ("load_time", float)):
            if key in body:
                setattr(self.b, key, kind(body[key]))
        evicted: list[str] = []
        targets = body.get("evict")
        if targets:
            names = list(self.loaded) if targets is True or targets == "*" else (
                [targets] if isinstance(targets, str) else list(targets))
            for raw in names:
                name = full_name(str(raw))
                if self.loaded.pop(name, None) is not None:
                    self.evictions += 1
                    evicted.append(name)
                    self.event("evicted", name, reason="control")
        if body.get("crash"):
            code = body["crash"] if isinstance(body["crash"], int) and body["crash"] > 1 else 1
            asyncio.get_running_loop().call_later(0.05, crash, code, "control")
        return web.json_response({"ok": True, "evicted": evicted, "behaviour": self.b.__dict__})

    # ---- generation ------------------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def wedge(self) -> None:
        self.hung += 1
        log("WARN", "fake: generation wedged")
        await asyncio.get_running_loop().create_future()

    async def tokens(self, n: int) -> AsyncIterator[str]:
        next_at = time.monotonic()
        for i in range(n):
            if self.b.hang:
                await self.wedge()
            rate = self.b.token_rate
            if rate > 0:
                next_at += 1.0 / rate
                await self.pause(next_at - time.monotonic())
            yield token_text(i)

    def limit(self, body: Json, openai: bool) -> tuple[int, bool]:
        keys = ("max_completion_tokens", "max_tokens") if openai else ()
        for key in keys:
            if isinstance(body.get(key), int) and body[key] >= 0:
                return int(body[key]), True
        options = body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int) \
                and options["num_predict"] >= 0:
            return int(options["num_predict"]), True
        return max(0, self.b.tokens), False

    async def run(self, request: web.Request, body: Json, kind: str,
                  prompt: str) -> web.StreamResponse:
        """Load if needed, wait for a parallel slot, then answer in the endpoint's format."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._run(request, body, kind, prompt)
        finally:
            self.in_flight -= 1

    async def _run(self, request: web.Request, body: Json, kind: str,
                   prompt: str) -> web.StreamResponse:
        openai = kind.startswith("oai")
        t0 = time.monotonic()
        self.recent.append({"path": request.path, "model": body.get("model"),
                            "keys": sorted(body), "stream": body.get("stream")})
        info = self.lookup(body.get("model"))
        self.keep_alive_of(body.get("keep_alive"))  # a bad value fails before any work
        self.generations += 1
        number = self.generations
        if self.b.fail_status:
            raise ApiError(self.b.fail_status, "fake failure")
        if self.b.hang or (self.b.hang_after is not None and number > self.b.hang_after):
            await self.wedge()
        stream = bool(body.get("stream", not openai))
        crash_here = False
        if stream:
            self.streams += 1
            crash_here = self.ns.fake_crash_mid_stream == self.streams
        if self.waiting >= self.max_queue:
            raise ApiError(503, "server busy, please try again.  maximum pending requests "
                           "exceeded")
        self.waiting += 1
        try:
            entry, load_s = await self.ensure_loaded(info, body.get("options"))
            entry.refs += 1
        finally:
            self.waiting -= 1
        try:
            async with entry.sem:
                self.processing += 1
                self.max_concurrent = max(self.max_concurrent, self.processing)
                try:
                    gen = OllamaGeneration(self, kind, body, info.name, prompt, load_s, t0)
                    return await (gen.stream(request, crash_here) if stream else gen.whole())
                finally:
                    self.processing -= 1
        finally:
            self.release(entry, body.get("keep_alive"))

    async def load_only(self, body: Json, chat: bool) -> web.StreamResponse:
        """/api/generate or /api/chat with no prompt: load, or unload with keep_alive 0."""
        info = self.lookup(body.get("model"))
        seconds = self.keep_alive_of(body.get("keep_alive"))
        if seconds == 0:
            entry = self.loaded.pop(info.name, None)
            if entry is not None:
                self.unloads += 1
                self.event("unloaded", info.name, reason="keep_alive 0")
            reason = "unload"
        else:
            entry, _ = await self.ensure_loaded(info, body.get("options"))
            entry.refs += 1
            self.release(entry, body.get("keep_alive"))
            reason = "load"
        out: Json = {"model": info.name, "created_at": iso(time.time())}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out.update({"done_reason": reason, "done": True})
        return web.json_response(out)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        prompt = body.get("prompt")
        if not prompt:
            return await self.load_only(body, chat=False)
        return await self.run(request, body, "generate", str(prompt))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        messages = body.get("messages")
        if not messages:
            return await self.load_only(body, chat=True)
        if not isinstance(messages, list):
            raise ApiError(400, "messages must be an array")
        return await self.run(request, body, "chat", render(messages))

    async def oai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        return await self.run(request, body, "oai_chat", render(messages))

    async def oai_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "prompt is required")
        return await self.run(request, body, "oai_text", text_of(prompt) if not isinstance(
            prompt, str) else prompt)

    async def oai_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [
            {"id": i.name, "object": "model", "created": int(i.modified), "owned_by": "library"}
            for i in self.known.values()]})

    async def embed_common(self, body: Json) -> tuple[ModelInfo, list[str], float]:
        info = self.lookup(body.get("model"))
        if self.b.fail_status:
            raise ApiError(self.b.fail_status, "fake failure")
        raw = body.get("input", body.get("prompt"))
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list):
            raise ApiError(400, "invalid input type")
        entry, load_s = await self.ensure_loaded(info, body.get("options"))
        entry.refs += 1
        self.release(entry, body.get("keep_alive"))
        return info, [str(t) for t in texts], load_s

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        info, texts, load_s = await self.embed_common(body)
        n = sum(max(1, count_tokens(t)) for t in texts)
        self.prompt_tokens_total += n
        return web.json_response({"model": info.name,
                                  "embeddings": [embedding_for(t) for t in texts],
                                  "total_duration": int(load_s * 1e9) + 1000,
                                  "load_duration": int(load_s * 1e9), "prompt_eval_count": n})

    async def embeddings_legacy(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        _, texts, _ = await self.embed_common(body)
        return web.json_response({"embedding": embedding_for(texts[0]) if texts else []})

    async def oai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        info, texts, _ = await self.embed_common(body)
        n = sum(max(1, count_tokens(t)) for t in texts)
        self.prompt_tokens_total += n
        return web.json_response({
            "object": "list", "model": info.name,
            "data": [{"object": "embedding", "index": i, "embedding": embedding_for(t)}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": n, "total_tokens": n}})


def render(messages: list[Any]) -> str:
    return "".join(f"<|{m.get('role', 'user')}|>{text_of(m.get('content'))}\n"
                   for m in messages if isinstance(m, dict))


class OllamaGeneration:
    """One generation: NDJSON for /api/*, SSE for the OpenAI-compatible /v1/*."""

    def __init__(self, srv: FakeOllama, kind: str, body: Json, model: str, prompt: str,
                 load_s: float, t0: float) -> None:
        self.srv = srv
        self.kind = kind
        self.body = body
        self.model = model
        self.openai = kind.startswith("oai")
        self.n_prompt = max(1, count_tokens(prompt))
        self.n_gen, self.limited = srv.limit(body, self.openai)
        self.load_s = load_s
        self.t0 = t0
        self.produced = 0
        self.id = ("chatcmpl-" if kind == "oai_chat" else "cmpl-") + str(uuid.uuid4().int)[:6]
        self.created = int(time.time())

    @property
    def reason(self) -> str:
        return "length" if self.limited else "stop"

    async def pieces(self) -> AsyncIterator[str]:
        async for piece in self.srv.tokens(self.n_gen):
            self.produced += 1
            yield piece

    def account(self) -> None:
        self.srv.prompt_tokens_total += self.n_prompt
        self.srv.tokens_predicted_total += self.produced

    def native(self, piece: str, done: bool) -> Json:
        out: Json = {"model": self.model, "created_at": iso(time.time())}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": piece}
        else:
            out["response"] = piece
        out["done"] = done
        if done:
            total = time.monotonic() - self.t0
            eval_s = max(total - self.load_s, 0.0)
            out.update({"done_reason": self.reason, "total_duration": int(total * 1e9),
                        "load_duration": int(self.load_s * 1e9),
                        "prompt_eval_count": self.n_prompt, "prompt_eval_duration": 1000,
                        "eval_count": self.produced, "eval_duration": int(eval_s * 1e9)})
            if self.kind == "generate":
                out["context"] = [1, 2, 3]
        return out

    def envelope(self, obj: str) -> Json:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.srv.fingerprint}

    def usage(self) -> Json:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.produced,
                "total_tokens": self.n_prompt + self.produced}

    async def whole(self) -> web.StreamResponse:
        text = "".join([p async for p in self.pieces()])
        self.account()
        if not self.openai:
            out = self.native(text, True)
            return web.json_response(out)
        if self.kind == "oai_chat":
            out = self.envelope("chat.completion")
            out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": self.reason}]
        else:
            out = self.envelope("text_completion")
            out["choices"] = [{"text": text, "index": 0, "finish_reason": self.reason}]
        out["usage"] = self.usage()
        return web.json_response(out)

    def chunk(self, piece: str, finish: str | None) -> Json:
        if self.kind == "oai_chat":
            out = self.envelope("chat.completion.chunk")
            out["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": piece},
                               "finish_reason": finish}]
        else:
            out = self.envelope("text_completion")
            out["choices"] = [{"text": piece, "index": 0, "finish_reason": finish}]
        return out

    async def stream(self, request: web.Request, crash_here: bool) -> web.StreamResponse:
        ctype = "text/event-stream" if self.openai else "application/x-ndjson"
        resp = web.StreamResponse(headers={"Content-Type": ctype,
                                           "X-Fake-Replica": self.srv.replica_id})
        await resp.prepare(request)

        async def send(obj: Json | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            frame = f"data: {data}\n\n" if self.openai else f"{data}\n"
            await resp.write(frame.encode())

        crash_at = min(2, max(self.n_gen - 1, 0)) if crash_here else None
        i = 0
        async for piece in self.pieces():
            await send(self.chunk(piece, None) if self.openai else self.native(piece, False))
            i += 1
            if crash_at is not None and i >= crash_at:
                await asyncio.sleep(0.05)
                crash(1, "mid-stream")
        if crash_at is not None:
            await asyncio.sleep(0.05)
            crash(1, "mid-stream")
        self.account()
        if self.openai:
            await send(self.chunk("", self.reason))
            options = self.body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                usage = self.envelope(self.chunk("", None)["object"])
                usage.update({"choices": [], "usage": self.usage()})
                await send(usage)
            await send("[DONE]")
        else:
            await send(self.native("", True))
        await resp.write_eof()
        return resp


def build_app(srv: FakeOllama) -> web.Application:
    app = web.Application(middlewares=[srv.middleware], client_max_size=1 << 30)
    r = app.router
    r.add_get("/", srv.root)  # aiohttp answers HEAD for GET routes
    r.add_get("/api/version", srv.version)
    r.add_get("/api/tags", srv.tags)
    r.add_get("/api/ps", srv.ps)
    r.add_post("/api/show", srv.show)
    r.add_post("/api/create", srv.create)
    r.add_post("/api/pull", srv.pull)
    r.add_delete("/api/delete", srv.delete)
    r.add_post("/api/copy", srv.copy)
    r.add_head("/api/blobs/{digest}", srv.blob_head)
    r.add_post("/api/blobs/{digest}", srv.blob_post)
    r.add_post("/api/generate", srv.generate)
    r.add_post("/api/chat", srv.chat)
    r.add_post("/api/embed", srv.embed)
    r.add_post("/api/embeddings", srv.embeddings_legacy)
    r.add_post("/v1/chat/completions", srv.oai_chat)
    r.add_post("/v1/completions", srv.oai_completions)
    r.add_get("/v1/models", srv.oai_models)
    r.add_post("/v1/embeddings", srv.oai_embeddings)
    r.add_get("/fake/stats", srv.fake_stats)
    r.add_post("/fake/control", srv.fake_control)
    return app


async def serve(ns: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        if signame == "SIGTERM" and ns.fake_ignore_sigterm:
            log("WARN", "fake: ignoring SIGTERM")
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    srv = FakeOllama(ns)
    runner = web.AppRunner(build_app(srv), access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, srv.host, srv.port)
    await site.start()
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            srv.port = int(address[1])
            break
    srv.replica_id = srv.replica_id or str(srv.port)
    log("INFO", f"server config env=map[OLLAMA_KEEP_ALIVE:{srv.keep_alive_default} "
        f"OLLAMA_MAX_LOADED_MODELS:{srv.max_loaded} OLLAMA_NUM_PARALLEL:{srv.num_parallel} "
        f"OLLAMA_MODELS:{srv.models_dir}]")
    log("INFO", f"Listening on {srv.host}:{srv.port} (version {VERSION})")
    if ns.fake_crash_after_s is not None:
        loop.call_later(ns.fake_crash_after_s, crash, 1, "crash-after-s")
    await stop.wait()
    log("INFO", "shutting down")
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=1.0)
    except TimeoutError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    if ns.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(serve(ns))


if __name__ == "__main__":
    sys.exit(main())
