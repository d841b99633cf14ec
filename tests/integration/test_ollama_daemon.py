"""The daemon with the Ollama engine (a faithful fake: no real Ollama binary is available)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes.spawn import OLLAMA
from tests.integration.daemon_proc import DaemonProc, engine_call, wait_gone


def ollama_model(name: str, modelfile: Path) -> dict[str, Any]:
    return {"name": name, "modelfile": str(modelfile), "engine": "ollama",
            "command": [sys.executable, OLLAMA], "replicas": 1, "slots": 2,
            "warmup": True, "canary_interval": 0,
            "health": {"interval": 0.25, "timeout": 1.0, "failures": 3}}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    gguf = Path(__file__).resolve().parents[2] / "cache" / "gemma-3-270m-q4_k_m.gguf"
    if not gguf.exists():  # the demo model, assembled once by the cache
        from supervisor.cache import resolve_model_source

        resolve_model_source("demo://gemma3-270m", base_dir=tmp_path, cache_dir=gguf.parent)
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.Modelfile").write_text(
            f"FROM {gguf}\nPARAMETER num_ctx 1024\nSYSTEM You are {name}.\n")
    d = DaemonProc(tmp_path, [ollama_model("alpha", tmp_path / "alpha.Modelfile"),
                              ollama_model("beta", tmp_path / "beta.Modelfile")],
                   cache_dir=str(tmp_path / "cache"))
    d.start()
    yield d
    pids = d.descendants()
    d.stop()
    assert wait_gone(pids) == []


def test_one_ollama_process_hosts_both_models_and_evictions_are_reloaded(
        daemon: DaemonProc) -> None:
    daemon.wait_ready(timeout=60)
    status = daemon.status()
    assert [r["id"] for r in status["replicas"]] == ["ollama/0"]
    replica = status["replicas"][0]
    assert replica["models"] == ["alpha", "beta"]
    port = replica["port"]
    stats = engine_call(port, "/fake/stats")
    assert stats["env"]["OLLAMA_KEEP_ALIVE"] == "-1"
    assert stats["env"]["OLLAMA_MAX_LOADED_MODELS"] == "2"
    assert stats["env"]["OLLAMA_NUM_PARALLEL"] == "2"
    assert stats["env"]["OLLAMA_HOST"] == f"127.0.0.1:{port}"
    assert sorted(stats["loaded"]) == ["alpha:latest", "beta:latest"]

    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0) as client:
        for name in ("alpha", "beta"):
            out = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                extra_body={"options": {"num_ctx": 8192}})  # would force a reload; stripped
            assert out.choices[0].message.content
    assert engine_call(port, "/fake/stats")["reloads"] == 0

    engine_call(port, "/fake/control", {"evict": "beta"})
    status = daemon.wait(lambda s: any(e["kind"] == "eviction" for e in s["events"]),
                         what="eviction noticed")
    assert status["replicas"][0]["evictions"] >= 1
    daemon.wait(lambda s: "beta:latest" in engine_call(port, "/fake/stats")["loaded"],
                what="beta reloaded")
    assert status["replicas"][0]["state"] == "READY"
