"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`)."""

from __future__ import annotations

import sys

from ..config import ModelConfig
from .base import Launch, LaunchRequest, gpu_env, total_ctx
from .llama_server import template_fallback

# llama-cpp-python's chat formats, for GGUFs without a chat template of their own.
CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama-3",
                "qwen2": "chatml", "qwen3": "chatml", "phi3": "chatml"}


class LlamaCppPython:
    """Adapter for `python -m llama_cpp.server`; it has no /health, so /v1/models."""

    name = "llama-cpp-python"

    def upstream_model(self, model: ModelConfig) -> str:
        return model.name

    def launch(self, req: LaunchRequest) -> Launch:
        model, mf = req.model, req.modelfile
        command = model.command or (sys.executable, "-m", "llama_cpp.server")
        argv = [
            *command,
            "--host", "127.0.0.1",
            "--port", str(req.port),
            "--model", str(req.model_path),
            "--model_alias", model.name,
            # llama-cpp-python runs one sequence at a time; slots beyond one queue inside it.
            "--n_ctx", str(total_ctx(model, mf) // model.slots),
            "--n_threads", str(req.threads),
            "--n_gpu_layers", "-1" if req.gpu_uuids else "0",
        ]
        if len(req.gpu_uuids) > 1:
            argv += ["--split_mode", "1",
                     "--tensor_split", *(f"{share:g}" for share in req.tensor_split)]
        if not any(a.startswith("--chat_format") for a in model.extra_args):
            fmt = template_fallback(req.model_path, CHAT_FORMATS)
            if fmt:
                argv += ["--chat_format", fmt]
        argv += list(model.extra_args)
        env = gpu_env(req.base_env, req.gpu_uuids)
        env.update(model.env)
        return Launch(
            argv=tuple(argv), env=env, port=req.port, health_path="/v1/models",
            slots=1,
        )
