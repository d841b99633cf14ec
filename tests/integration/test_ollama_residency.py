"""OllamaResidency against fake_ollama as a real child process, launched as the adapter says."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from gguf import GGUFWriter

from supervisor import ollama_residency
from supervisor.backends.base import LaunchRequest
from supervisor.backends.ollama import Ollama
from supervisor.config import ModelConfig
from supervisor.modelfile import Modelfile, parse_modelfile
from supervisor.ollama_residency import OllamaError, OllamaResidency
from tests.fakes.spawn import OLLAMA, FakeProc, free_port, start_ollama

MODELFILE = '''FROM ./tiny.gguf
PARAMETER num_ctx 1024
PARAMETER temperature 0.3
PARAMETER stop "<eos>"
TEMPLATE """{{ .Prompt }}"""
SYSTEM You are terse.
MESSAGE user hi
'''


def write_gguf(path: Path) -> Path:
    """A tiny but real GGUF file (one tensor) for Ollama to take as a blob."""
    w = GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def config(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, modelfile=Path(f"/etc/llm/{name}.Modelfile"),
                       engine="ollama", command=(sys.executable, OLLAMA), **kw)


@pytest.fixture
def mf(tmp_path: Path) -> Modelfile:
    return parse_modelfile(MODELFILE, str(tmp_path / "tiny.Modelfile"))


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def gguf_digest(gguf: Path) -> str:
    return hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.fixture
def launch_fake(tmp_path: Path, mf: Modelfile, gguf: Path) -> Iterator[Callable[..., FakeProc]]:
    """Start fake_ollama with the argv and OLLAMA_* environment that the adapter builds."""
    started: list[FakeProc] = []

    def start(hosted: int = 0) -> FakeProc:
        others = tuple((config(f"other{i}"), mf, gguf) for i in range(hosted))
        base = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        base["LLM_SUPERVISOR_OLLAMA_STORE"] = str(tmp_path / "store")
        launch = Ollama().launch(LaunchRequest(
            replica_id="tiny/0", model=config("tiny"), modelfile=mf, model_path=gguf,
            port=free_port(), base_env=base, hosted=others))
        assert launch.argv == (sys.executable, OLLAMA, "serve")
        env = {k: v for k, v in launch.env.items() if k.startswith(("OLLAMA_", "CUDA_"))}
        fake = start_ollama(env=env, port=launch.port, ready_path=launch.health_path)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
async def residency() -> AsyncIterator[OllamaResidency]:
    async with aiohttp.ClientSession() as session:
        yield OllamaResidency(session, timeout=5, load_timeout=10)


def ps_names(fake: FakeProc) -> list[str]:
    status, body = fake.request("GET", "/api/ps")
    assert status == 200
    return sorted(m["name"] for m in body["models"])


async def test_the_fake_runs_with_the_adapters_settings(
        launch_fake: Callable[..., FakeProc], tmp_path: Path) -> None:
    fake = launch_fake(hosted=2)
    cfg = fake.stats()["config"]
    assert cfg["keep_alive"] is None  # -1: forever
    assert cfg["max_loaded_models"] == 3
    assert cfg["num_parallel"] == 2
    assert cfg["models"] == str(tmp_path / "store")


async def test_create_and_preload_make_it_resident(
        launch_fake: Callable[..., FakeProc], residency: OllamaResidency, mf: Modelfile,
        gguf: Path, gguf_digest: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real_hash = ollama_residency._sha256_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(ollama_residency, "_sha256_file", counting)
    fake = launch_fake()
    blob_path = f"/api/blobs/sha256:{gguf_digest}"

    await residency.ensure_created(fake.url, "tiny", mf, gguf)
    assert fake.stats()["requests"][blob_path] == 2  # HEAD (404), then the upload
    assert "tiny:latest" in fake.stats()["known"]
    assert ps_names(fake) == []
    assert await residency.missing(fake.url, ["tiny"]) == ["tiny"]

    await residency.preload(fake.url, "tiny")
    assert ps_names(fake) == ["tiny:latest"]
    assert await residency.missing(fake.url, ["tiny", "tiny:latest"]) == []
    loaded = fake.stats()["loaded"]["tiny:latest"]
    assert loaded == {"num_ctx": 1024, "refs": 0, "keep_alive": None}

    status, show = fake.request("POST", "/api/show", {"model": "tiny"})
    assert status == 200
    assert show["template"] == "{{ .Prompt }}"
    assert show["system"] == "You are terse."
    assert "num_ctx" in show["parameters"] and "temperature" in show["parameters"]

    # Created again (another server, same file): the blob is only checked, and not re-hashed.
    await residency.ensure_created(fake.url, "tiny", mf, gguf)
    assert fake.stats()["requests"][blob_path] == 3
    assert hashed == [gguf]
    assert list(residency.digests.values()) == [gguf_digest]


async def test_eviction_is_seen_and_repaired(
        launch_fake: Callable[..., FakeProc], residency: OllamaResidency, mf: Modelfile,
        gguf: Path) -> None:
    fake = launch_fake(hosted=1)
    hosted = [("tiny", mf, gguf), ("other0", mf, gguf)]

    assert await residency.ensure_resident(fake.url, hosted) == ["tiny", "other0"]
    assert ps_names(fake) == ["other0:latest", "tiny:latest"]
    creates = fake.stats()["requests"]["/api/create"]
    assert creates == 2

    # Nothing to do while both stay loaded: no create, no load.
    loads = fake.stats()["loads"]
    assert await residency.ensure_resident(fake.url, hosted) == []
    assert fake.stats()["loads"] == loads

    assert fake.control(evict="other0")["evicted"] == ["other0:latest"]
    assert await residency.missing(fake.url, ["tiny", "other0"]) == ["other0"]

    assert await residency.ensure_resident(fake.url, hosted) == ["other0"]
    assert ps_names(fake) == ["other0:latest", "tiny:latest"]
    stats = fake.stats()
    assert stats["loads"] == loads + 1
    assert stats["requests"]["/api/create"] == creates  # already there: only reloaded


async def test_a_model_deleted_behind_our_back_is_created_again(
        launch_fake: Callable[..., FakeProc], residency: OllamaResidency, mf: Modelfile,
        gguf: Path) -> None:
    fake = launch_fake()
    assert await residency.ensure_resident(fake.url, [("tiny", mf, gguf)]) == ["tiny"]
    status, _ = fake.request("DELETE", "/api/delete", {"model": "tiny"})
    assert status == 200
    assert await residency.ensure_resident(fake.url, [("tiny", mf, gguf)]) == ["tiny"]
    assert fake.stats()["requests"]["/api/create"] == 2
    assert ps_names(fake) == ["tiny:latest"]


async def test_too_few_loaded_models_allowed_is_an_error(
        launch_fake: Callable[..., FakeProc], residency: OllamaResidency, mf: Modelfile,
        gguf: Path) -> None:
    fake = launch_fake()  # OLLAMA_MAX_LOADED_MODELS=1, but two models
    with pytest.raises(OllamaError) as info:
        await residency.ensure_resident(fake.url, [("tiny", mf, gguf), ("extra", mf, gguf)])
    assert info.value.endpoint == "GET /api/ps"
    assert "not resident after preloading: tiny" in str(info.value)


async def test_errors_name_the_endpoint_and_status(
        launch_fake: Callable[..., FakeProc], residency: OllamaResidency) -> None:
    fake = launch_fake()
    with pytest.raises(OllamaError) as info:
        await residency.preload(fake.url, "nope")
    assert (info.value.endpoint, info.value.status) == ("POST /api/generate", 404)
    assert str(info.value) == (f'ollama at {fake.url}: POST /api/generate answered 404: '
                               'model "nope" not found, try pulling it first')

    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OllamaError) as info:
        await residency.missing(closed, ["tiny"])
    assert (info.value.endpoint, info.value.status) == ("GET /api/ps", None)
    assert str(info.value).startswith(f"ollama at {closed}: GET /api/ps got no answer: ")
