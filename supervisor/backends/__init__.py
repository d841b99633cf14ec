"""Engine adapters: each builds a child's argv and environment, and never spawns."""

from __future__ import annotations

from .base import Backend, Launch, LaunchRequest
from .llama_cpp_python import LlamaCppPython
from .llama_server import LlamaServer

__all__ = ["Backend", "Launch", "LaunchRequest", "backend_for"]


def backend_for(engine: str) -> Backend:
    """The adapter for an engine name from the config."""
    if engine == "llama-server":
        return LlamaServer()
    if engine == "llama-cpp-python":
        return LlamaCppPython()
    if engine == "ollama":
        from .ollama import Ollama

        return Ollama()
    raise ValueError(f"unknown engine {engine!r}")
