"""The `llm-supervisor` command: serve, check, plan, pull, status, top."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, default_config, load_config
from .modelfile import ModelfileError, load_modelfile

logger = logging.getLogger("supervisor")

ENV_CONFIG = "LLM_SUPERVISOR_CONFIG"


def _config_path(arg: str | None) -> Path | None:
    """-c, else $LLM_SUPERVISOR_CONFIG, else ./supervisor.yaml if present, else None."""
    if arg:
        return Path(arg)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    local = Path("supervisor.yaml")
    return local if local.exists() else None


def _inventory(spec: str | None) -> Any:
    from .gpus import read_inventory, simulated_inventory

    return simulated_inventory(spec) if spec else read_inventory()


def _load(path: Path | None, gpu_count: int) -> Config:
    if path is None:
        return default_config(gpu_count)
    return load_config(path)


def _setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    # watchdog logs every inotify event at debug, including writes to our own log file.
    logging.getLogger("watchdog").setLevel(max(logging.INFO, logging.getLogger().level))


def _run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_fn())
    except ImportError:
        return asyncio.run(coro_fn())


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .app import Daemon
    from .daemon import PlanError

    path = _config_path(args.config)
    inventory = _inventory(args.gpus)
    config = _load(path, len(inventory.gpus))
    server = config.server
    if args.host or args.port is not None:
        server = replace(server, host=args.host or server.host,
                         port=server.port if args.port is None else args.port)
        config = replace(config, server=server)
    if path is None:
        logger.info("no config file: serving the embedded default (%s)",
                    ", ".join(m.name for m in config.models))
    daemon = Daemon(config, path, inventory)
    try:
        return _run(daemon.run)
    except PlanError as exc:
        print("refusing to start: the configured models do not fit this host\n", file=sys.stderr)
        print(exc, file=sys.stderr)
        return 2


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = _load(path, 0)
    for model in config.models:
        load_modelfile(model.modelfile)
    where = str(path) if path else "the embedded default"
    print(f"{where}: OK ({len(config.models)} models: "
          f"{', '.join(m.name for m in config.models)})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .daemon import prepare_plan
    from .placement import format_plan, plan_to_json

    inventory = _inventory(args.gpus)
    config = _load(_config_path(args.config), len(inventory.gpus))
    plan = prepare_plan(config, inventory)
    if args.json:
        print(json.dumps(plan_to_json(plan, inventory), indent=2))
    else:
        print(format_plan(plan, inventory))
    return 0 if plan.fits else 2


def cmd_pull(args: argparse.Namespace) -> int:
    from .cache import resolve_model_source

    config = _load(_config_path(args.config), 0)
    server = config.server
    wanted = set(args.models)
    unknown = wanted - {m.name for m in config.models}
    if unknown:
        print(f"unknown models: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    for model in config.models:
        if wanted and model.name not in wanted:
            continue
        mf = load_modelfile(model.modelfile)
        path = resolve_model_source(
            mf.from_, base_dir=model.modelfile.parent, cache_dir=server.cache_dir,
            hf_endpoint=server.hf_endpoint, hf_token=server.hf_token,
            ollama_models=server.ollama_models, progress=True)
        print(f"{model.name}: {path}")
    return 0


def _get_status(url: str, token: str | None) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + "/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def cmd_status(args: argparse.Namespace) -> int:
    from .tui import format_status_table

    try:
        status = _get_status(args.url, args.token)
    except (urllib.error.URLError, OSError) as exc:
        print(f"daemon unreachable at {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status_table(status))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .tui import TopApp

    TopApp(args.url, args.token).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-supervisor", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LLM_SUPERVISOR_LOG", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="supervisor.yaml (default: ./supervisor.yaml, "
                                              f"${ENV_CONFIG}, or the embedded default)")

    p = sub.add_parser("serve", help="run the daemon")
    with_config(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--gpus", help="pretend the host has these GPUs (e.g. 2x24GiB); for tests")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check", help="validate the config and Modelfiles, start nothing")
    with_config(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("plan", help="print the placement plan, start nothing")
    with_config(p)
    p.add_argument("--gpus", help="a hypothetical host: 8x80GiB, 2x24GiB,1x48GiB, cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("pull", help="fill the model cache ahead of serve")
    with_config(p)
    p.add_argument("models", nargs="*", help="model names (default: all)")
    p.set_defaults(func=cmd_pull)
    for name, func, help_ in (("status", cmd_status, "one-shot status table"),
                              ("top", cmd_top, "terminal UI")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=os.environ.get("LLM_SUPERVISOR_URL",
                                                       "http://127.0.0.1:8080"))
        p.add_argument("--token", default=os.environ.get("LLM_SUPERVISOR_ADMIN_TOKEN"),
                       help="admin token (or $LLM_SUPERVISOR_ADMIN_TOKEN)")
        if name == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
        return code
    except (ConfigError, ModelfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from .cache import CacheError

        if isinstance(exc, CacheError | FileNotFoundError | ValueError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
