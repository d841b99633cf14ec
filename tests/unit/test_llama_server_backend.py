"""The llama-server adapter: the exact argv and environment a child gets."""

from __future__ import annotations

from pathlib import Path

import gguf

from supervisor.backends.base import LaunchRequest
from supervisor.backends.llama_server import LlamaServer, chat_template_args
from supervisor.config import ModelConfig
from supervisor.modelfile import parse_modelfile


def write_gguf(path: Path, arch: str, template: str | None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_builtin_template_only_when_the_gguf_has_none(tmp_path: Path) -> None:
    bare = write_gguf(tmp_path / "bare.gguf", "gemma3", None)
    templated = write_gguf(tmp_path / "t.gguf", "gemma3", "{{ messages }}")
    assert chat_template_args(bare, ()) == ["--no-jinja", "--chat-template", "gemma"]
    assert chat_template_args(templated, ()) == []
    assert chat_template_args(bare, ("--chat-template", "chatml")) == []
    assert chat_template_args(write_gguf(tmp_path / "x.gguf", "unknownarch", None), ()) == []
    assert chat_template_args(tmp_path / "missing.gguf", ()) == []


def test_split_across_two_gpus(tmp_path: Path) -> None:
    model = ModelConfig(name="big", modelfile=tmp_path / "m", slots=4, ctx=4096,
                        command=("/usr/bin/llama-server",), extra_args=("--flash-attn", "on"),
                        env=(("GGML_CUDA_NO_PINNED", "1"),))
    mf = parse_modelfile("FROM x.gguf\nPARAMETER num_batch 1024\nPARAMETER use_mmap false\n")
    launch = LlamaServer().launch(LaunchRequest(
        replica_id="big/0", model=model, modelfile=mf, model_path=tmp_path / "missing.gguf",
        port=41000, gpu_uuids=("GPU-a", "GPU-b"), tensor_split=(0.6, 0.4), cpu_set=(0, 1, 2, 3),
        threads=4, base_env={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
    assert launch.argv == (
        "/usr/bin/llama-server", "--host", "127.0.0.1", "--port", "41000",
        "--model", str(tmp_path / "missing.gguf"), "--alias", "big", "--ctx-size", "16384",
        "--parallel", "4", "--threads", "4", "--metrics", "--slots", "--no-webui",
        "--n-gpu-layers", "999", "--split-mode", "layer", "--tensor-split", "0.6,0.4",
        "--batch-size", "1024", "--no-mmap", "--flash-attn", "on")
    assert launch.env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b",
                          "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "GGML_CUDA_NO_PINNED": "1"}
    assert launch.health_path == "/health" and launch.slots == 4
    assert launch.base_url == "http://127.0.0.1:41000"


def test_one_gpu_and_cpu_only(tmp_path: Path) -> None:
    model = ModelConfig(name="m", modelfile=tmp_path / "m", command=("llama-server",))
    mf = parse_modelfile("FROM x.gguf\n")
    one = LlamaServer().launch(LaunchRequest(
        replica_id="m/0", model=model, modelfile=mf, model_path=tmp_path / "x.gguf",
        port=1, gpu_uuids=("GPU-a",), threads=2))
    assert one.env["CUDA_VISIBLE_DEVICES"] == "GPU-a"
    assert "--split-mode" not in one.argv
    assert one.argv[one.argv.index("--n-gpu-layers") + 1] == "999"
    cpu = LlamaServer().launch(LaunchRequest(
        replica_id="m/0", model=model, modelfile=mf, model_path=tmp_path / "x.gguf", port=1))
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu.argv[cpu.argv.index("--n-gpu-layers") + 1] == "0"
    assert cpu.argv[cpu.argv.index("--ctx-size") + 1] == "4096"  # 2048 default × 2 slots
