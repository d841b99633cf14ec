"""Keep models resident in `ollama serve`: create them from GGUF blobs, preload, watch /api/ps."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .modelfile import Modelfile

__all__ = [
    "OllamaError",
    "OllamaResidency",
    "create_body",
    "create_parameters",
    "full_name",
    "with_num_ctx",
]

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


class OllamaError(RuntimeError):
    """An Ollama API call that failed: where, which endpoint, what status, what it said."""

    def __init__(self, base_url: str, endpoint: str, status: int | None, message: str) -> None:
        self.base_url = base_url
        self.endpoint = endpoint  # "POST /api/create"
        self.status = status  # None: no HTTP answer at all
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        got = "got no answer" if self.status is None else f"answered {self.status}"
        return f"ollama at {self.base_url}: {self.endpoint} {got}: {self.message}"


# --- pure helpers -------------------------------------------------------------------------------


def full_name(name: str) -> str:
    """`gemma` -> `gemma:latest`: Ollama's name for a model given without a tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def with_num_ctx(mf: Modelfile, ctx: int | None) -> Modelfile:
    """The Modelfile with PARAMETER num_ctx set to `ctx` (a model's `ctx:`); None keeps it."""
    if ctx is None:
        return mf
    params = (*(p for p in mf.parameters if p[0] != "num_ctx"), ("num_ctx", ctx))
    return dataclasses.replace(mf, parameters=params)


def create_parameters(mf: Modelfile) -> dict[str, Any]:
    """The Modelfile's PARAMETERs as /api/create's `parameters` (last wins; `stop` is a list)."""
    out: dict[str, Any] = {}
    for key, value in mf.parameters:
        if key != "stop":
            out[key] = value
    if mf.stops:
        out["stop"] = list(mf.stops)
    return out


def create_body(name: str, mf: Modelfile, files: dict[str, str],
                adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """The /api/create request for a model built from uploaded blobs and a Modelfile."""
    body: dict[str, Any] = {"model": name, "files": dict(files)}
    if adapters:
        body["adapters"] = dict(adapters)
    parameters = create_parameters(mf)
    if parameters:
        body["parameters"] = parameters
    if mf.template is not None:
        body["template"] = mf.template
    if mf.system is not None:
        body["system"] = mf.system
    if mf.license:
        body["license"] = list(mf.license)
    if mf.messages:
        body["messages"] = [{"role": role, "content": text} for role, text in mf.messages]
    body["stream"] = False
    return body


def _adapter_path(mf: Modelfile, adapter: str) -> Path:
    """An ADAPTER path; a relative one is relative to the Modelfile, as in Ollama."""
    path = Path(adapter).expanduser()
    return path if path.is_absolute() else Path(mf.source).parent / path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# --- the runtime helper ---------------------------------------------------------------------------


class OllamaResidency:
    """Creates, preloads and re-checks models in `ollama serve` processes over one session."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float = 30.0,
                 load_timeout: float = 300.0) -> None:
        self.session = session
        self.timeout = timeout  # quick calls: /api/ps, /api/tags, blob HEAD
        self.load_timeout = load_timeout  # create, preload, and each read of a blob upload
        # sha256 hex digests keyed by (path, size, mtime_ns): each GGUF is hashed once
        self.digests: dict[tuple[str, int, int], str] = {}
        self._hash_locks: dict[tuple[str, int, int], asyncio.Lock] = {}
        # (base_url, full name) -> fingerprint of the /api/create body last sent there
        self._created: dict[tuple[str, str], str] = {}

    # ---- HTTP ----------------------------------------------------------------------------------

    async def _call(self, base_url: str, method: str, endpoint: str, *, expect: tuple[int, ...],
                    timeout: aiohttp.ClientTimeout, json_body: Any = None,
                    data: Any = None) -> Any:
        """One request; the parsed JSON answer (None when empty), or OllamaError."""
        what = f"{method} {endpoint}"
        try:
            async with self.session.request(method, base_url + endpoint, json=json_body,
                                            data=data, timeout=timeout) as resp:
                status = resp.status
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OllamaError(base_url, what, None, _describe(exc)) from exc
        text = raw.decode(errors="replace").strip()
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text
        if status not in expect:
            message = parsed.get("error") if isinstance(parsed, dict) else None
            raise OllamaError(base_url, what, status, str(message or text or "no body"))
        return parsed

    def _quick(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout)

    def _slow(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.load_timeout)

    # ---- blobs ---------------------------------------------------------------------------------

    async def digest(self, path: Path) -> str:
        """The file's sha256 (hex), computed once per (path, size, mtime) off the event loop."""
        st = await asyncio.to_thread(path.stat)
        key = (str(path), st.st_size, st.st_mtime_ns)
        lock = self._hash_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self.digests:
                logger.info("hashing %s (%d bytes) for ollama", path, st.st_size)
                self.digests[key] = await asyncio.to_thread(_sha256_file, path)
        return self.digests[key]

    async def upload_blob(self, base_url: str, path: Path) -> str:
        """Make sure Ollama holds the file as a blob; its "sha256:<hex>" digest."""
        digest = "sha256:" + await self.digest(path)
        endpoint = f"/api/blobs/{digest}"
        try:
            await self._call(base_url, "HEAD", endpoint, expect=(200,), timeout=self._quick())
            return digest
        except OllamaError as exc:
            if exc.status != 404:
                raise
        size = (await asyncio.to_thread(path.stat)).st_size
        logger.info("uploading %s (%d bytes) to ollama at %s", path.name, size, base_url)
        # Between reads of a large upload, allow as long as a load; no limit on the total.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=self.load_timeout)
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            await self._call(base_url, "POST", endpoint, expect=(200, 201), timeout=timeout,
                             data=handle)
        finally:
            await asyncio.to_thread(handle.close)
        return digest

    # ---- models --------------------------------------------------------------------------------

    async def _body(self, name: str, modelfile: Modelfile, gguf: Path) -> dict[str, Any]:
        files = {gguf.name: "sha256:" + await self.digest(gguf)}
        adapters: dict[str, str] = {}
        for adapter in modelfile.adapters:
            path = _adapter_path(modelfile, adapter)
            adapters[path.name] = "sha256:" + await self.digest(path)
        return create_body(name, modelfile, files, adapters)

    async def ensure_created(self, base_url: str, name: str, modelfile: Modelfile,
                             gguf: Path) -> None:
        """Upload the GGUF (and ADAPTERs) if Ollama lacks them, then create `name` from them."""
        await self.upload_blob(base_url, gguf)
        for adapter in modelfile.adapters:
            await self.upload_blob(base_url, _adapter_path(modelfile, adapter))
        body = await self._body(name, modelfile, gguf)
        answer = await self._call(base_url, "POST", "/api/create", expect=(200,),
                                  timeout=self._slow(), json_body=body)
        status = answer.get("status") if isinstance(answer, dict) else None
        if status != "success":
            raise OllamaError(base_url, "POST /api/create", 200,
                              f"expected status success, got {answer!r}")
        self._created[(base_url, full_name(name))] = _fingerprint(body)
        logger.info("created %s in ollama at %s from %s", name, base_url, gguf.name)

    async def preload(self, base_url: str, name: str) -> None:
        """Load `name` and keep it loaded (/api/generate with no prompt, keep_alive -1)."""
        answer = await self._call(base_url, "POST", "/api/generate", expect=(200,),
                                  timeout=self._slow(),
                                  json_body={"model": name, "keep_alive": -1})
        if isinstance(answer, dict) and answer.get("done") is False:
            raise OllamaError(base_url, "POST /api/generate", 200,
                              f"expected a finished load, got {answer!r}")
        logger.info("loaded %s in ollama at %s", name, base_url)

    async def _names(self, base_url: str, endpoint: str) -> set[str]:
        answer = await self._call(base_url, "GET", endpoint, expect=(200,), timeout=self._quick())
        models = answer.get("models") if isinstance(answer, dict) else None
        if not isinstance(models, list):
            raise OllamaError(base_url, f"GET {endpoint}", 200,
                              f"expected a models list, got {answer!r}")
        names: set[str] = set()
        for entry in models:
            if isinstance(entry, dict):
                for key in ("name", "model"):
                    if isinstance(entry.get(key), str) and entry[key]:
                        names.add(full_name(entry[key]))
        return names

    async def missing(self, base_url: str, names: Sequence[str]) -> list[str]:
        """The names that /api/ps does not list as loaded, in the order given."""
        loaded = await self._names(base_url, "/api/ps")
        return [n for n in names if full_name(n) not in loaded]

    async def ensure_resident(self, base_url: str,
                              hosted: Sequence[tuple[str, Modelfile, Path]]) -> list[str]:
        """Create (when needed) and preload each model; the names that had to be (re)loaded."""
        known = await self._names(base_url, "/api/tags")
        recreated: set[str] = set()
        for name, mf, gguf in hosted:
            key = (base_url, full_name(name))
            if (key[1] not in known
                    or self._created.get(key) != _fingerprint(await self._body(name, mf, gguf))):
                await self.ensure_created(base_url, name, mf, gguf)
                recreated.add(name)
        names = [name for name, _, _ in hosted]
        gone = set(await self.missing(base_url, names))
        # A re-created model is preloaded too: a loaded copy may run older parameters.
        reload = [n for n in names if n in gone or n in recreated]
        for name in reload:
            await self.preload(base_url, name)
        if reload:
            still = await self.missing(base_url, names)
            if still:
                raise OllamaError(base_url, "GET /api/ps", 200,
                                  f"not resident after preloading: {', '.join(still)} "
                                  "(too little memory, or OLLAMA_MAX_LOADED_MODELS too low?)")
        return reload
