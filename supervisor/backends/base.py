"""What every engine adapter builds: argv, environment, port and probe paths."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import ModelConfig
from ..modelfile import Modelfile


@dataclass(frozen=True)
class LaunchRequest:
    """Everything an adapter needs to describe one child process."""

    replica_id: str
    model: ModelConfig
    modelfile: Modelfile
    model_path: Path
    port: int
    gpu_uuids: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    cpu_set: tuple[int, ...] = ()
    threads: int = 1
    base_env: Mapping[str, str] = field(default_factory=dict)
    # Ollama hosts several models in one process; the others are listed here.
    hosted: tuple[tuple[ModelConfig, Modelfile, Path], ...] = ()


@dataclass(frozen=True)
class Launch:
    """The child's command line and environment, and how to talk to it."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    port: int
    health_path: str
    # Whether a non-streaming request is streamed from the engine all the same, so the
    # daemon sees every byte (stall detection, TTFT). An engine that can show its progress
    # another way (`progress_path`) is asked for the whole answer instead: half the work
    # for the engine and for the daemon. Either way it is retried until the client has a byte.
    stream_upstream: bool = True
    # An endpoint served by the engine's generation loop itself (llama-server's /slots):
    # while requests are in flight it must answer within 2 x stall_timeout, or the
    # generation is wedged even though /health answers.
    progress_path: str | None = None
    # How many sequences the engine runs at once (its slots).
    slots: int = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Backend(Protocol):
    """An engine adapter: pure description, never spawns."""

    name: str

    def launch(self, req: LaunchRequest) -> Launch:
        """Build the child's argv and environment."""
        ...

    def upstream_model(self, model: ModelConfig) -> str:
        """The model name to put in requests sent to the engine."""
        ...


def gpu_env(base: Mapping[str, str], gpu_uuids: tuple[str, ...]) -> dict[str, str]:
    """Environment pinned to the given GPUs; no GPUs means CUDA sees none."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_uuids)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def total_ctx(model: ModelConfig, mf: Modelfile) -> int:
    """Context per slot times slots: llama.cpp splits --ctx-size across slots."""
    per_slot = model.ctx or int(mf.param("num_ctx", 2048) or 2048)
    return per_slot * model.slots
