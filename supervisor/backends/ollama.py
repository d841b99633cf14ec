"""Ollama: one `ollama serve` per GPU that hosts every model placed there, all kept loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .base import Launch, LaunchRequest, gpu_env

__all__ = ["RELOAD_OPTIONS", "STORE_ENV", "Ollama", "ollama_store", "strip_reload_options"]

# Set by the daemon (in the environment it passes down) to pick the OLLAMA_MODELS store.
STORE_ENV = "LLM_SUPERVISOR_OLLAMA_STORE"

# Per-request `options` that change how the model is loaded: Ollama reloads it to honour them.
RELOAD_OPTIONS = frozenset({
    "num_ctx", "num_gpu", "num_batch", "num_thread", "use_mmap", "use_mlock", "numa",
    "low_vram", "main_gpu", "f16_kv", "vocab_only",
})


def ollama_store(base_env: Mapping[str, str], model_path: Path) -> Path:
    """The OLLAMA_MODELS directory: $LLM_SUPERVISOR_OLLAMA_STORE, else next to the GGUF."""
    chosen = base_env.get(STORE_ENV, "").strip()
    return Path(chosen) if chosen else model_path.parent / "ollama-store"


class Ollama:
    """Adapter for `ollama serve`; models are created and preloaded over its API afterwards."""

    name = "ollama"

    def upstream_model(self, model: ModelConfig) -> str:
        # The residency helper creates each model in Ollama under its configured name.
        return model.name

    def launch(self, req: LaunchRequest) -> Launch:
        model = req.model
        command = model.command or ("ollama",)
        # `ollama serve` takes no useful flags; extra_args still go on so a typo fails loudly.
        argv = (*command, "serve", *model.extra_args)
        env = gpu_env(req.base_env, req.gpu_uuids)
        env.update({
            "OLLAMA_HOST": f"127.0.0.1:{req.port}",
            "OLLAMA_KEEP_ALIVE": "-1",
            "OLLAMA_MAX_LOADED_MODELS": str(1 + len(req.hosted)),
            "OLLAMA_NUM_PARALLEL": str(model.slots),
            "OLLAMA_MODELS": str(ollama_store(req.base_env, req.model_path)),
            "OLLAMA_NOHISTORY": "1",
            # Several servers may share one store: a starting one must not prune the blobs
            # another has uploaded but not yet referenced from a manifest.
            "OLLAMA_NOPRUNE": "1",
        })
        env.update(model.env)
        return Launch(argv=argv, env=env, port=req.port, health_path="/", slots=model.slots)


def _forever(keep_alive: Any) -> bool:
    """Whether a keep_alive value means "never unload" (any negative number or duration)."""
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive < 0
    return isinstance(keep_alive, str) and keep_alive.strip().startswith("-")


def strip_reload_options(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of a request body without the fields that would make Ollama reload or unload."""
    out = dict(body)
    options = out.get("options")
    if isinstance(options, dict):
        kept = {k: v for k, v in options.items() if k not in RELOAD_OPTIONS}
        if kept:
            out["options"] = kept
        else:
            del out["options"]
    if "keep_alive" in out and not _forever(out["keep_alive"]):
        del out["keep_alive"]
    return out
