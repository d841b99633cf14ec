"""Load and validate supervisor.yaml into frozen dataclasses; errors name file, line and key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import SourceError

__all__ = [
    "DEFAULT_MODELFILE",
    "ENGINES",
    "REPO_DIR",
    "Config",
    "ConfigError",
    "HealthConfig",
    "ModelConfig",
    "ServerConfig",
    "default_config",
    "load_config",
    "parse_config",
]

REPO_DIR = Path(__file__).parents[1]  # the source checkout (the package is installed editable)
DEFAULT_MODELFILE = REPO_DIR / "modelfiles" / "gemma3-270m.Modelfile"
ENGINES = ("llama-server", "llama-cpp-python", "ollama")
ENV_API_KEYS = "LLM_SUPERVISOR_API_KEYS"
ENV_ADMIN_TOKEN = "LLM_SUPERVISOR_ADMIN_TOKEN"
ENV_HF_TOKEN = "HF_TOKEN"


class ConfigError(SourceError):
    """An invalid configuration: which file, line and key, and what was expected."""


@dataclass(frozen=True)
class HealthConfig:
    """How a replica's health endpoint is probed."""

    interval: float = 2.0
    timeout: float = 2.0
    failures: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its Modelfile, engine, replica count and supervision timings."""

    name: str
    modelfile: Path
    engine: str = "llama-server"
    command: tuple[str, ...] = ()
    replicas: int | Literal["per-gpu"] = 1
    slots: int = 2
    ctx: int | None = None
    gpus: tuple[int, ...] = ()
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    load_timeout: float = 300.0
    stall_timeout: float = 20.0
    canary_interval: float = 10.0
    canary_timeout: float = 10.0
    health: HealthConfig = field(default_factory=HealthConfig)
    warmup: bool = True
    max_queue: int = 256
    queue_timeout: float = 120.0
    affinity: bool = True
    affinity_margin: float = 0.5
    stop_grace: float = 10.0


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The daemon itself: listener, auth, directories, limits and restart policy."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    admin_socket: Path | None = None
    state_dir: Path
    log_dir: Path
    cache_dir: Path
    drain_timeout: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_connections: int = 1024
    header_timeout: float = 10.0  # a new connection's first request head must come in this
    idle_timeout: float = 30.0  # a kept-alive connection waiting for its next request
    body_timeout: float = 60.0  # the request body, once its head is in
    log_prompts: bool = False
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0
    max_failures: int = 5
    failure_window: float = 300.0
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = None
    ollama_models: Path | None = None
    # auto: pin each engine to its CPU set only on hosts with PIN_MIN_CPUS or more; on a
    # smaller host every core would hold an engine and the daemon would fight for one.
    pin_cpus: str = "auto"


PIN_CPUS = ("auto", "always", "never")
PIN_MIN_CPUS = 4


def pins_cpus(server: ServerConfig, host_cpus: int) -> bool:
    """Whether engines are pinned to their CPU sets on a host with `host_cpus` CPUs."""
    if server.pin_cpus == "auto":
        return host_cpus >= PIN_MIN_CPUS
    return server.pin_cpus == "always"


@dataclass(frozen=True)
class Config:
    """A whole validated configuration; `source` is the file it came from, if any."""

    server: ServerConfig
    models: tuple[ModelConfig, ...]
    source: Path | None = None

    def model(self, name: str) -> ModelConfig:
        """The model called `name`; KeyError if there is none."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


# --- reading YAML nodes -------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_NULL, _STR, _INT, _FLOAT, _BOOL = (_TAG + t for t in ("null", "str", "int", "float", "bool"))
_MERGE = _TAG + "merge"
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class _Reader:
    """What every converter needs: the file name for errors, the base for paths, the env."""

    def __init__(self, source: str, base_dir: Path, env: Mapping[str, str]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.env = env

    def error(self, node: Node | None, key: str, message: str) -> ConfigError:
        line = None if node is None else node.start_mark.line + 1
        return ConfigError(self.source, line, key, message)

    def path(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.base_dir / path))


Conv = Callable[[_Reader, Node, str], Any]
_Items = dict[str, tuple[Node, Node]]


def _construct(node: Node) -> Any:
    return SafeConstructor().construct_object(node, deep=True)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _shown(node: Node) -> str:
    """How a value is quoted back in messages: 'text', 12, true, null, a list, a mapping."""
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    if node.tag == _NULL:
        return "nothing" if node.value == "" else "null"
    return repr(node.value) if node.tag == _STR else str(node.value)


def _sub(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _suggestion(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _mapping(r: _Reader, node: Node | None, key: str) -> _Items:
    """The keys of a mapping node with their key and value nodes; null counts as empty.

    `<<` merge keys are applied (explicit keys win) without mutating the shared nodes.
    """
    if node is None or _is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        raise r.error(node, key, f"expected a mapping, got {_shown(node)}")
    items: _Items = {}
    own: _Items = {}
    for key_node, value in node.value:
        if key_node.tag == _MERGE:
            for source in reversed(_merge_sources(r, value, key)):
                items.update(_mapping(r, source, key))
            continue
        if not isinstance(key_node, ScalarNode) or _is_null(key_node):
            raise r.error(key_node, key, f"expected a string key, got {_shown(key_node)}")
        if key_node.value in own:
            first = own[key_node.value][0].start_mark.line + 1
            message = f"duplicate key (first at line {first})"
            raise r.error(key_node, _sub(key, key_node.value), message)
        own[str(key_node.value)] = (key_node, value)
    return {**items, **own}


def _merge_sources(r: _Reader, node: Node, key: str) -> list[Node]:
    """The mappings a `<<:` merges: one mapping or a list of them (earlier ones win)."""
    sources = node.value if isinstance(node, SequenceNode) else [node]
    for source in sources:
        if not isinstance(source, MappingNode):
            raise r.error(source, _sub(key, "<<"), "expected a mapping or a list of mappings "
                          f"to merge, got {_shown(source)}")
    return list(sources)


def _read_fields(
    r: _Reader, items: _Items, spec: Mapping[str, Conv], prefix: str
) -> dict[str, Any]:
    """Convert every key in `items` with its converter from `spec`; unknown keys are errors."""
    for name, (key_node, _) in items.items():
        if name not in spec:
            hint = _suggestion(name, spec) or f" (known keys: {', '.join(spec)})"
            raise r.error(key_node, _sub(prefix, name), f"unknown key{hint}")
    return {name: spec[name](r, value, _sub(prefix, name)) for name, (_, value) in items.items()}


# --- converters: (reader, node, key) -> value ---------------------------------------------------


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {low:g} and {high:g}"
    return f" >= {low:g}" if low is not None else ""


def _number_of(node: Node) -> int | float | None:
    """The number a scalar holds (plain '1e3' included), or None."""
    if not isinstance(node, ScalarNode):
        return None
    if node.tag in (_INT, _FLOAT):
        value = _construct(node)
        return value if math.isfinite(value) else None
    if node.tag == _STR and node.style is None and _NUMBER_RE.fullmatch(node.value):
        return float(node.value)
    return None


def _text(r: _Reader, node: Node, key: str) -> str:
    """Any non-empty scalar, as written (so `token: 0123` stays '0123')."""
    if not isinstance(node, ScalarNode) or _is_null(node):
        raise r.error(node, key, f"expected a string, got {_shown(node)}")
    if not str(node.value).strip():
        raise r.error(node, key, f"expected a non-empty string, got {_shown(node)}")
    return str(node.value).strip()


def _optional(conv: Conv) -> Conv:
    def convert(r: _Reader, node: Node, key: str) -> Any:
        return None if _is_null(node) else conv(r, node, key)

    return convert


def _bool(r: _Reader, node: Node, key: str) -> bool:
    if not isinstance(node, ScalarNode) or node.tag != _BOOL:
        raise r.error(node, key, f"expected true or false, got {_shown(node)}")
    return bool(_construct(node))


def _int(low: int | None = None, high: int | None = None) -> Conv:
    def convert(r: _Reader, node: Node, key: str) -> int:
        if not isinstance(node, ScalarNode) or node.tag != _INT:
            raise r.error(node, key, f"expected an integer{_bounds(low, high)}, got {_shown(node)}")
        value = int(_construct(node))
        if (low is not None and value < low) or (high is not None and value > high):
            raise r.error(node, key, f"expected an integer{_bounds(low, high)}, got {value}")
        return value

    return convert


def _number(low: float) -> Conv:
    def convert(r: _Reader, node: Node, key: str) -> float:
        value = _number_of(node)
        if value is None or value < low:
            raise r.error(node, key, f"expected a number{_bounds(low, None)}, got {_shown(node)}")
        return float(value)

    return convert


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(node: Node) -> float | None:
    """Seconds from a number or a string like '500ms', '30s', '5m', '1h30m'; None if neither."""
    number = _number_of(node)
    if number is not None:
        return float(number)
    if not isinstance(node, ScalarNode) or node.tag != _STR:
        return None
    compact = node.value.replace(" ", "").lower()
    if _NUMBER_RE.fullmatch(compact):
        return float(compact)
    if not compact or _DURATION_PART.sub("", compact):
        return None
    return sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(compact))


def _duration(allow_zero: bool = False) -> Conv:
    def convert(r: _Reader, node: Node, key: str) -> float:
        value = _parse_duration(node)
        if value is None:
            raise r.error(node, key, "expected a duration (seconds, or a string like '500ms', "
                          f"'30s', '5m'), got {_shown(node)}")
        if value < 0 or (value == 0 and not allow_zero):
            wanted = "zero or positive" if allow_zero else "positive"
            raise r.error(node, key, f"expected a {wanted} duration, got {_shown(node)}")
        return value

    return convert


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def _size(r: _Reader, node: Node, key: str) -> int:
    """Bytes from an integer or a string like '8MiB' (1024-based) or '8MB' (1000-based)."""
    value: float | None = None
    if isinstance(node, ScalarNode) and node.tag == _INT:
        value = _construct(node)
    elif isinstance(node, ScalarNode) and node.tag == _STR:
        match = _SIZE_RE.fullmatch(node.value.strip())
        if match:
            unit = (match.group(2) or "").lower()
            base = 1024 if "i" in unit else 1000
            value = float(match.group(1)) * base ** _SIZE_POWERS[unit[:1]]
    if value is None or value < 1:
        raise r.error(node, key, f"expected a size in bytes (an integer, or a string like '8MiB' "
                      f"or '8MB'), got {_shown(node)}")
    return int(value)


def _choice(options: tuple[str, ...]) -> Conv:
    def convert(r: _Reader, node: Node, key: str) -> str:
        value = node.value if isinstance(node, ScalarNode) and node.tag == _STR else None
        if value not in options:
            hint = _suggestion(str(value), options) if value else ""
            expected = ", ".join(options)
            raise r.error(node, key, f"expected one of {expected}, got {_shown(node)}{hint}")
        return str(value)

    return convert


def _path(r: _Reader, node: Node, key: str) -> Path:
    return r.path(_text(r, node, key))


def _existing_file(r: _Reader, node: Node, key: str) -> Path:
    path = _path(r, node, key)
    if not path.exists():
        raise r.error(node, key, f"no such file: {path}")
    if not path.is_file():
        raise r.error(node, key, f"not a file: {path}")
    return path


def _read_text(r: _Reader, node: Node, key: str) -> tuple[Path, str]:
    path = _existing_file(r, node, key)
    try:
        return path, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise r.error(node, key, f"cannot read {path}: {exc}") from None


def _list(r: _Reader, node: Node, key: str, what: str) -> list[Node]:
    if not isinstance(node, SequenceNode):
        raise r.error(node, key, f"expected a list of {what}, got {_shown(node)}")
    return list(node.value)


def _args(r: _Reader, node: Node, key: str) -> tuple[str, ...]:
    """Arguments as a list, or as one string split like a shell would (no shell is run)."""
    if isinstance(node, ScalarNode) and node.tag == _STR:
        try:
            return tuple(shlex.split(node.value))
        except ValueError as exc:
            raise r.error(node, key, f"cannot split into arguments: {exc}") from None
    items = _list(r, node, key, "arguments (or a string)")
    return tuple(_text(r, item, f"{key}[{i}]") for i, item in enumerate(items))


def _gpu_list(r: _Reader, node: Node, key: str) -> tuple[int, ...]:
    index = _int(0)
    gpus: list[int] = []
    for i, item in enumerate(_list(r, node, key, "GPU indexes")):
        gpu = index(r, item, f"{key}[{i}]")
        if gpu in gpus:
            raise r.error(item, f"{key}[{i}]", f"duplicate GPU index {gpu}")
        gpus.append(gpu)
    return tuple(gpus)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_map(r: _Reader, node: Node, key: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, (key_node, value) in _mapping(r, node, key).items():
        if not _ENV_NAME.fullmatch(name):
            raise r.error(key_node, _sub(key, name), "expected an environment variable name "
                          "(letters, digits, _)")
        pairs.append((name, _text(r, value, _sub(key, name))))
    return tuple(pairs)


def _replicas(r: _Reader, node: Node, key: str) -> int | Literal["per-gpu"]:
    if isinstance(node, ScalarNode) and node.tag == _STR and node.value == "per-gpu":
        return "per-gpu"
    if not isinstance(node, ScalarNode) or node.tag != _INT:
        raise r.error(node, key, f"expected an integer or 'per-gpu', got {_shown(node)}")
    value = int(_construct(node))
    if value < 1:
        raise r.error(node, key, f"expected an integer >= 1 or 'per-gpu', got {value}")
    return value


_MODEL_NAME = re.compile(r"[A-Za-z0-9._:-]+")


def _model_name(r: _Reader, node: Node, key: str) -> str:
    name = _text(r, node, key)
    if not _MODEL_NAME.fullmatch(name):
        raise r.error(node, key, f"expected a name of letters, digits and . _ : -, got {name!r}")
    return name


def _key_list(r: _Reader, node: Node, key: str) -> tuple[str, ...]:
    items = _list(r, node, key, "strings")
    return tuple(_text(r, item, f"{key}[{i}]") for i, item in enumerate(items))


def _key_file(r: _Reader, node: Node, key: str) -> tuple[str, ...]:
    """API keys from a file: one a line; blank lines and # comments skipped."""
    path, text = _read_text(r, node, key)
    keys = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not keys:
        raise r.error(node, key, f"no keys in {path} (expected one a line)")
    return tuple(keys)


def _token_file(r: _Reader, node: Node, key: str) -> str:
    path, text = _read_text(r, node, key)
    token = text.strip()
    if not token or "\n" in token:
        got = "an empty file" if not token else "several lines"
        raise r.error(node, key, f"expected one line holding the token in {path}, got {got}")
    return token


def _url(r: _Reader, node: Node, key: str) -> str:
    url = _text(r, node, key)
    if not url.startswith(("http://", "https://")):
        raise r.error(node, key, f"expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


_HEALTH_SPEC: dict[str, Conv] = {
    "interval": _duration(),
    "timeout": _duration(),
    "failures": _int(1),
}


def _health(r: _Reader, node: Node, key: str) -> dict[str, Any]:
    """The keys a `health:` mapping sets; merged over `defaults.health` later."""
    return _read_fields(r, _mapping(r, node, key), _HEALTH_SPEC, key)


# --- sections -----------------------------------------------------------------------------------

_SERVER_SPEC: dict[str, Conv] = {
    "host": _text,
    "port": _int(1, 65535),
    "api_keys": _key_list,
    "api_keys_file": _key_file,
    "admin_token": _optional(_text),
    "admin_token_file": _token_file,
    "admin_socket": _optional(_path),
    "state_dir": _path,
    "log_dir": _path,
    "cache_dir": _path,
    "drain_timeout": _duration(allow_zero=True),
    "max_body_bytes": _size,
    "max_connections": _int(1),
    "header_timeout": _duration(),
    "idle_timeout": _duration(),
    "body_timeout": _duration(),
    "log_prompts": _bool,
    "backoff_initial": _duration(),
    "backoff_max": _duration(),
    "stable_after": _duration(),
    "max_failures": _int(1),
    "failure_window": _duration(),
    "hf_endpoint": _url,
    "hf_token": _optional(_text),
    "ollama_models": _optional(_path),
    "pin_cpus": _choice(PIN_CPUS),
}

_MODEL_SPEC: dict[str, Conv] = {
    "name": _model_name,
    "modelfile": _existing_file,
    "engine": _choice(ENGINES),
    "command": _args,
    "replicas": _replicas,
    "slots": _int(1),
    "ctx": _optional(_int(1)),
    "gpus": _gpu_list,
    "extra_args": _args,
    "env": _env_map,
    "load_timeout": _duration(),
    "stall_timeout": _duration(),
    "canary_interval": _duration(allow_zero=True),
    "canary_timeout": _duration(),
    "health": _health,
    "warmup": _bool,
    "max_queue": _int(0),
    "queue_timeout": _duration(),
    "affinity": _bool,
    "affinity_margin": _number(0),
    "stop_grace": _duration(allow_zero=True),
}


def _unique(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for group in groups for k in group))


def _server(r: _Reader, node: Node | None) -> ServerConfig:
    items = _mapping(r, node, "server")
    vals = _read_fields(r, items, _SERVER_SPEC, "server")
    env_keys = (k.strip() for k in r.env.get(ENV_API_KEYS, "").split(","))
    vals["api_keys"] = _unique(vals.get("api_keys", ()), vals.pop("api_keys_file", ()),
                               (k for k in env_keys if k))
    token_file = vals.pop("admin_token_file", None)
    if token_file is not None and vals.get("admin_token") is not None:
        raise r.error(items["admin_token_file"][0], "server.admin_token_file",
                      "set admin_token or admin_token_file, not both")
    env_token = r.env.get(ENV_ADMIN_TOKEN)
    vals["admin_token"] = vals.get("admin_token") or token_file or env_token or None
    vals["hf_token"] = vals.get("hf_token") or r.env.get(ENV_HF_TOKEN) or None
    # Under systemd, StateDirectory= and friends are the defaults (first path of each).
    for key, variable, fallback in (("state_dir", "STATE_DIRECTORY", r.base_dir / "state"),
                                    ("log_dir", "LOGS_DIRECTORY", r.base_dir / "logs"),
                                    ("cache_dir", "CACHE_DIRECTORY", REPO_DIR / "cache")):
        given = r.env.get(variable, "").split(":")[0]
        vals.setdefault(key, Path(given) if given else fallback)
    server = ServerConfig(**vals)
    if server.backoff_max < server.backoff_initial:
        key = "backoff_max" if "backoff_max" in items else "backoff_initial"
        raise r.error(items[key][1], f"server.{key}", f"backoff_max ({server.backoff_max:g}s) "
                      f"must not be less than backoff_initial ({server.backoff_initial:g}s)")
    return server


def _defaults(r: _Reader, node: Node | None) -> dict[str, Any]:
    items = _mapping(r, node, "defaults")
    if "name" in items:
        raise r.error(items["name"][0], "defaults.name", "a name cannot be a default; "
                      "set it on each model")
    return _read_fields(r, items, _MODEL_SPEC, "defaults")


def _model(
    r: _Reader, node: Node, key: str, defaults: Mapping[str, Any]
) -> tuple[ModelConfig, Node]:
    """The model at `node` over `defaults`, and the node of its name (for duplicate errors)."""
    if not isinstance(node, MappingNode):
        raise r.error(node, key, f"expected a mapping, got {_shown(node)}")
    items = _mapping(r, node, key)
    own = _read_fields(r, items, _MODEL_SPEC, key)
    for required in ("name", "modelfile"):
        if required not in own and required not in defaults:
            raise r.error(node, _sub(key, required), "missing (every model needs a name and "
                          "a modelfile)")
    vals = {**defaults, **own}
    vals["health"] = HealthConfig(**{**defaults.get("health", {}), **own.get("health", {})})
    return ModelConfig(**vals), items["name"][1]


def _models(r: _Reader, node: Node | None, defaults: Mapping[str, Any]) -> tuple[ModelConfig, ...]:
    if node is None:
        raise r.error(None, "models", "missing (at least one model is required)")
    items = _list(r, node, "models", "models")
    if not items:
        raise r.error(node, "models", "expected at least one model, got an empty list")
    models: list[ModelConfig] = []
    first_line: dict[str, int] = {}
    for i, item in enumerate(items):
        model, name_node = _model(r, item, f"models[{i}]", defaults)
        if model.name in first_line:
            raise r.error(name_node, f"models[{i}].name", f"duplicate model name {model.name!r} "
                          f"(first defined at line {first_line[model.name]})")
        first_line[model.name] = name_node.start_mark.line + 1
        models.append(model)
    return tuple(models)


def _compose(r: _Reader, text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        message = f"invalid YAML: {exc.problem or exc.context}"
        raise ConfigError(r.source, line, "", message) from None
    except yaml.YAMLError as exc:
        raise ConfigError(r.source, None, "", f"invalid YAML: {exc}") from None


# --- public API ---------------------------------------------------------------------------------


def _reader(source: str, base_dir: Path | None, env: Mapping[str, str] | None) -> _Reader:
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    return _Reader(source, base, os.environ if env is None else env)


def parse_config(text: str, source: str = "supervisor.yaml", base_dir: Path | None = None, *,
                 env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; relative paths resolve against `base_dir` (default: cwd).

    `env` (default os.environ) supplies LLM_SUPERVISOR_API_KEYS, LLM_SUPERVISOR_ADMIN_TOKEN
    and HF_TOKEN. `source` names the file in errors; the result's `source` is None.
    """
    r = _reader(source, base_dir, env)
    root = _compose(r, text)
    try:
        return _config(r, root)
    except RecursionError:
        raise ConfigError(source, None, "", "an alias refers to itself (<<: *anchor in its own "
                          "anchor?)") from None


def _config(r: _Reader, root: Node | None) -> Config:
    items = _mapping(r, root, "")
    _read_fields(r, items, dict.fromkeys(("server", "defaults", "models"), _keep), "")
    section = {name: value for name, (_, value) in items.items()}
    server = _server(r, section.get("server"))
    defaults = _defaults(r, section.get("defaults"))
    return Config(server, _models(r, section.get("models"), defaults))


def _keep(r: _Reader, node: Node, key: str) -> Node:
    return node


def load_config(path: Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; relative paths resolve against its directory."""
    absolute = Path(os.path.abspath(path))
    try:
        text = absolute.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, "", f"cannot read: {exc}") from None
    config = parse_config(text, str(path), absolute.parent, env=env)
    return dataclasses.replace(config, source=absolute)


def default_config(gpu_count: int, base_dir: Path | None = None, *,
                   env: Mapping[str, str] | None = None) -> Config:
    """The embedded default: the demo Gemma 3 270M on llama-server, one replica per GPU."""
    r = _reader("<default config>", base_dir, env)
    model = ModelConfig(
        name="gemma3-270m",
        modelfile=DEFAULT_MODELFILE,
        engine="llama-server",
        replicas="per-gpu" if gpu_count > 0 else 2,
        slots=2,
    )
    return Config(_server(r, None), (model,))
