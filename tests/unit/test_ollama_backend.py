"""The Ollama adapter's command line and environment, and the pure request/create helpers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from supervisor.backends import backend_for
from supervisor.backends.base import LaunchRequest
from supervisor.backends.ollama import Ollama, strip_reload_options
from supervisor.config import ModelConfig
from supervisor.modelfile import Modelfile, parse_modelfile
from supervisor.ollama_residency import create_body, create_parameters, full_name, with_num_ctx

GGUF = Path("/var/cache/llm/hf/gemma/gemma-3-270m-q4_k_m.gguf")


def model(name: str = "gemma3-270m", **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, modelfile=Path(f"/etc/llm/{name}.Modelfile"),
                       engine="ollama", **kw)


def modelfile(text: str = "FROM demo://gemma3-270m\n") -> Modelfile:
    return parse_modelfile(text, "/etc/llm/gemma.Modelfile")


def request(m: ModelConfig, **kw: Any) -> LaunchRequest:
    kw.setdefault("base_env", {"PATH": "/usr/bin", "HOME": "/root"})
    return LaunchRequest(replica_id=f"{m.name}/0", model=m, modelfile=modelfile(),
                         model_path=GGUF, port=41234, **kw)


# ---- launch ------------------------------------------------------------------------------------


def test_defaults_on_one_gpu() -> None:
    launch = Ollama().launch(request(model(), gpu_uuids=("GPU-aaaa",)))
    assert launch.argv == ("ollama", "serve")
    assert launch.env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "CUDA_VISIBLE_DEVICES": "GPU-aaaa",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "OLLAMA_HOST": "127.0.0.1:41234",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "OLLAMA_NUM_PARALLEL": "2",
        "OLLAMA_MODELS": "/var/cache/llm/hf/gemma/ollama-store",
        "OLLAMA_NOHISTORY": "1",
        "OLLAMA_NOPRUNE": "1",
    }
    assert launch.port == 41234
    assert launch.health_path == "/"
    assert launch.base_url == "http://127.0.0.1:41234"
    assert launch.slots == 2
    assert launch.stream_upstream is True


def test_hosted_models_store_env_command_and_overrides() -> None:
    other = (model("qwen"), modelfile(), Path("/m/qwen.gguf"))
    third = (model("phi"), modelfile(), Path("/m/phi.gguf"))
    m = model(command=("/opt/ollama/bin/ollama",), slots=4,
              env=(("OLLAMA_DEBUG", "1"), ("OLLAMA_KEEP_ALIVE", "24h")))
    base = {"PATH": "/usr/bin", "LLM_SUPERVISOR_OLLAMA_STORE": "/srv/llm/ollama",
            "OLLAMA_HOST": "0.0.0.0:11434", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    launch = Ollama().launch(request(m, base_env=base, hosted=(other, third),
                                     gpu_uuids=("GPU-aaaa", "GPU-bbbb"),
                                     tensor_split=(0.5, 0.5)))
    assert launch.argv == ("/opt/ollama/bin/ollama", "serve")
    assert launch.env == {
        "PATH": "/usr/bin",
        "LLM_SUPERVISOR_OLLAMA_STORE": "/srv/llm/ollama",
        "CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "OLLAMA_HOST": "127.0.0.1:41234",  # the inherited one never wins
        "OLLAMA_KEEP_ALIVE": "24h",  # model.env goes last, so it does
        "OLLAMA_MAX_LOADED_MODELS": "3",
        "OLLAMA_NUM_PARALLEL": "4",
        "OLLAMA_MODELS": "/srv/llm/ollama",
        "OLLAMA_NOHISTORY": "1",
        "OLLAMA_NOPRUNE": "1",
        "OLLAMA_DEBUG": "1",
    }
    assert launch.slots == 4


def test_cpu_only_hides_every_gpu_and_blank_store_env_falls_back() -> None:
    base = {"LLM_SUPERVISOR_OLLAMA_STORE": "  "}
    launch = Ollama().launch(request(model(), base_env=base))
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""
    assert launch.env["OLLAMA_MODELS"] == "/var/cache/llm/hf/gemma/ollama-store"


def test_extra_args_follow_serve() -> None:
    launch = Ollama().launch(request(model(extra_args=("--verbose",))))
    assert launch.argv == ("ollama", "serve", "--verbose")


def test_request_env_is_not_mutated() -> None:
    base = {"PATH": "/usr/bin"}
    Ollama().launch(request(model(), base_env=base))
    assert base == {"PATH": "/usr/bin"}


def test_upstream_model_and_registry() -> None:
    backend = backend_for("ollama")
    assert isinstance(backend, Ollama)
    assert backend.name == "ollama"
    assert backend.upstream_model(model("gemma3-270m")) == "gemma3-270m"


# ---- strip_reload_options --------------------------------------------------------------------


def test_strip_removes_load_options_and_keeps_sampling() -> None:
    body: dict[str, Any] = {
        "model": "gemma3-270m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.1,
        "options": {"num_ctx": 8192, "num_gpu": 10, "num_batch": 64, "num_thread": 3,
                    "use_mmap": False, "use_mlock": True, "numa": True, "low_vram": True,
                    "main_gpu": 1, "f16_kv": True, "vocab_only": False,
                    "temperature": 0.3, "top_k": 5, "stop": ["\n"]},
        "keep_alive": 0,
    }
    before = copy.deepcopy(body)
    out = strip_reload_options(body)
    assert out == {
        "model": "gemma3-270m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.1,
        "options": {"temperature": 0.3, "top_k": 5, "stop": ["\n"]},
    }
    assert body == before  # not mutated
    assert out is not body and out["options"] is not body["options"]


def test_strip_drops_options_left_empty_and_leaves_odd_options_alone() -> None:
    assert strip_reload_options({"model": "m", "options": {"num_ctx": 1}}) == {"model": "m"}
    assert strip_reload_options({"model": "m", "options": "x"}) == {"model": "m", "options": "x"}
    assert strip_reload_options({"model": "m"}) == {"model": "m"}


@pytest.mark.parametrize("keep_alive, kept", [
    (-1, True), ("-1", True), ("-1m", True), (-3.5, True),
    (0, False), ("0", False), ("5m", False), (300, False), (None, False), (True, False),
])
def test_strip_keep_alive_keeps_only_forever(keep_alive: Any, kept: bool) -> None:
    out = strip_reload_options({"model": "m", "keep_alive": keep_alive})
    assert ("keep_alive" in out) is kept
    if kept:
        assert out["keep_alive"] == keep_alive


# ---- /api/create request (pure) --------------------------------------------------------------


FULL = '''FROM ./gemma.gguf
PARAMETER num_ctx 4096
PARAMETER temperature 0.2
PARAMETER stop "<end_of_turn>"
PARAMETER stop "<eos>"
PARAMETER temperature 0.4
TEMPLATE """{{ .Prompt }}"""
SYSTEM You are terse.
LICENSE "Gemma terms"
MESSAGE user hi
MESSAGE assistant hello
'''


def test_create_body_maps_every_modelfile_field() -> None:
    mf = parse_modelfile(FULL, "/etc/llm/gemma.Modelfile")
    body = create_body("gemma3-270m", mf, {"gemma.gguf": "sha256:abc"},
                       {"lora.gguf": "sha256:def"})
    assert body == {
        "model": "gemma3-270m",
        "files": {"gemma.gguf": "sha256:abc"},
        "adapters": {"lora.gguf": "sha256:def"},
        "parameters": {"num_ctx": 4096, "temperature": 0.4,
                       "stop": ["<end_of_turn>", "<eos>"]},
        "template": "{{ .Prompt }}",
        "system": "You are terse.",
        "license": ["Gemma terms"],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}],
        "stream": False,
    }


def test_create_body_minimal() -> None:
    body = create_body("m", modelfile("FROM ./m.gguf\n"), {"m.gguf": "sha256:0"})
    assert body == {"model": "m", "files": {"m.gguf": "sha256:0"}, "stream": False}
    assert create_parameters(modelfile("FROM x\n")) == {}


def test_with_num_ctx_overrides_the_modelfile() -> None:
    mf = modelfile("FROM x\nPARAMETER num_ctx 2048\nPARAMETER top_k 3\n")
    assert create_parameters(with_num_ctx(mf, 8192)) == {"top_k": 3, "num_ctx": 8192}
    assert with_num_ctx(mf, None) is mf
    assert create_parameters(mf)["num_ctx"] == 2048


@pytest.mark.parametrize("name, full", [
    ("gemma", "gemma:latest"), ("gemma:2b", "gemma:2b"),
    ("org/gemma", "org/gemma:latest"), ("host:5000/org/gemma", "host:5000/org/gemma:latest"),
])
def test_full_name(name: str, full: str) -> None:
    assert full_name(name) == full
