"""Tests for loading and validating supervisor.yaml."""

import dataclasses
import re
from pathlib import Path

import pytest

from supervisor import config as config_module
from supervisor.config import (
    Config,
    ConfigError,
    HealthConfig,
    ModelConfig,
    ServerConfig,
    default_config,
    load_config,
    parse_config,
    pins_cpus,
)

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
models:
  - name: gemma
    modelfile: gemma.Modelfile
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "gemma.Modelfile").write_text("FROM demo://gemma3-270m\n")
    (tmp_path / "other.Modelfile").write_text("FROM ./other.gguf\n")
    return tmp_path


def parse(text: str, base: Path, env: dict[str, str] | None = None) -> Config:
    return parse_config(text, "supervisor.yaml", base, env=env or {})


def error_of(text: str, base: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, base, env)
    return str(info.value)


def with_model(base: Path, lines: str) -> str:
    """MINIMAL with extra model keys (indented under the model) appended."""
    return MINIMAL + "".join(f"    {line}\n" for line in lines.splitlines())


# --- valid configs ------------------------------------------------------------------------------

FULL = """\
server:
  host: 0.0.0.0
  port: 9000
  api_keys: [k1, k2]
  admin_token: s3cret
  admin_socket: run/admin.sock
  state_dir: /var/lib/llm
  log_dir: logs
  cache_dir: ~/models
  drain_timeout: 45s
  max_body_bytes: 1MiB
  max_connections: 10
  log_prompts: true
  backoff_initial: 500ms
  backoff_max: 2m
  stable_after: 90
  max_failures: 3
  failure_window: 1h
  hf_endpoint: https://hf-mirror.example/
  hf_token: hf_abc
  ollama_models: /usr/share/ollama/.ollama/models
models:
  - name: gemma3:270m
    modelfile: gemma.Modelfile
    engine: llama-cpp-python
    command: /opt/bin/server --verbose "a b"
    replicas: per-gpu
    slots: 3
    ctx: 4096
    gpus: [0, 1]
    extra_args: [--flash-attn, on]
    env: {CUDA_LAUNCH_BLOCKING: 1, NAME: x}
    load_timeout: 10m
    stall_timeout: 1.5
    canary_interval: 0
    canary_timeout: 3s
    health: {interval: 1, timeout: 250ms, failures: 4}
    warmup: false
    max_queue: 0
    queue_timeout: 30s
    affinity: false
    affinity_margin: 1
    stop_grace: 0
"""


def test_full_config(base: Path) -> None:
    cfg = parse(FULL, base)
    assert cfg.source is None
    assert cfg.server == ServerConfig(
        host="0.0.0.0",
        port=9000,
        api_keys=("k1", "k2"),
        admin_token="s3cret",
        admin_socket=base / "run" / "admin.sock",
        state_dir=Path("/var/lib/llm"),
        log_dir=base / "logs",
        cache_dir=Path.home() / "models",
        drain_timeout=45.0,
        max_body_bytes=1024 * 1024,
        max_connections=10,
        log_prompts=True,
        backoff_initial=0.5,
        backoff_max=120.0,
        stable_after=90.0,
        max_failures=3,
        failure_window=3600.0,
        hf_endpoint="https://hf-mirror.example",
        hf_token="hf_abc",
        ollama_models=Path("/usr/share/ollama/.ollama/models"),
    )
    assert cfg.models == (
        ModelConfig(
            name="gemma3:270m",
            modelfile=base / "gemma.Modelfile",
            engine="llama-cpp-python",
            command=("/opt/bin/server", "--verbose", "a b"),
            replicas="per-gpu",
            slots=3,
            ctx=4096,
            gpus=(0, 1),
            extra_args=("--flash-attn", "on"),
            env=(("CUDA_LAUNCH_BLOCKING", "1"), ("NAME", "x")),
            load_timeout=600.0,
            stall_timeout=1.5,
            canary_interval=0.0,
            canary_timeout=3.0,
            health=HealthConfig(interval=1.0, timeout=0.25, failures=4),
            warmup=False,
            max_queue=0,
            queue_timeout=30.0,
            affinity=False,
            affinity_margin=1.0,
            stop_grace=0.0,
        ),
    )
    assert cfg.model("gemma3:270m") is cfg.models[0]


def test_minimal_config_uses_defaults(base: Path) -> None:
    cfg = parse(MINIMAL, base)
    assert cfg.models == (ModelConfig(name="gemma", modelfile=base / "gemma.Modelfile"),)
    server = cfg.server
    assert (server.host, server.port, server.api_keys, server.admin_token) == (
        "127.0.0.1", 8080, (), None,
    )
    assert server.state_dir == base / "state"
    assert server.log_dir == base / "logs"
    assert server.cache_dir == REPO / "cache"
    assert server.max_body_bytes == 8 * 1024 * 1024
    assert (server.header_timeout, server.idle_timeout, server.body_timeout) == (10, 30, 60)


def test_connection_timeouts_parse(base: Path) -> None:
    cfg = parse("server: {header_timeout: 500ms, idle_timeout: 2m, body_timeout: 5}\n"
                + MINIMAL, base)
    server = cfg.server
    assert (server.header_timeout, server.idle_timeout, server.body_timeout) == (0.5, 120, 5)


def test_defaults_merge(base: Path) -> None:
    text = """\
defaults:
  slots: 4
  engine: ollama
  health: {interval: 5, failures: 3}
models:
  - name: a
    modelfile: gemma.Modelfile
  - name: b
    modelfile: other.Modelfile
    slots: 1
    health: {timeout: 7}
"""
    a, b = parse(text, base).models
    assert (a.slots, a.engine, a.health) == (4, "ollama", HealthConfig(5.0, 2.0, 3))
    assert (b.slots, b.engine, b.health) == (1, "ollama", HealthConfig(5.0, 7.0, 3))
    assert b.modelfile == base / "other.Modelfile"


def test_defaults_may_carry_the_modelfile(base: Path) -> None:
    text = "defaults: {modelfile: gemma.Modelfile}\nmodels: [{name: a}, {name: b, replicas: 3}]\n"
    a, b = parse(text, base).models
    assert a.modelfile == b.modelfile == base / "gemma.Modelfile"
    assert (a.replicas, b.replicas) == (1, 3)


def test_yaml_anchors_and_merge_keys(base: Path) -> None:
    text = """\
models:
  - &common
    name: a
    modelfile: gemma.Modelfile
    slots: 3
  - <<: *common
    name: b
"""
    a, b = parse(text, base).models
    assert (a.name, b.name, b.slots, b.modelfile) == ("a", "b", 3, base / "gemma.Modelfile")


def test_shared_anchor_used_twice_and_nested_merges(base: Path) -> None:
    config = """\
defaults: &base
  slots: 5
  health: &h {interval: 3}
models:
  - &more {<<: *base, name: a, modelfile: gemma.Modelfile, slots: 6}
  - {<<: [*more, *base], name: b, health: *h}
  - {<<: *base, name: c, modelfile: gemma.Modelfile, health: *h}
"""
    a, b, c = parse(config, base).models
    assert (a.slots, b.slots, c.slots) == (6, 6, 5)
    assert b.modelfile == base / "gemma.Modelfile"
    assert a.health == b.health == c.health == HealthConfig(interval=3.0)


def test_error_bad_merge_and_recursive_alias(base: Path) -> None:
    assert error_of("server:\n  <<: [1]\n" + MINIMAL, base) == (
        "supervisor.yaml:2: server.<<: expected a mapping or a list of mappings to merge, got 1"
    )
    assert error_of("server: &s\n  <<: *s\n" + MINIMAL, base) == (
        "supervisor.yaml: an alias refers to itself (<<: *anchor in its own anchor?)"
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2", 2.0), ("2.5", 2.5), ('"500ms"', 0.5), ("30s", 30.0), ("5m", 300.0),
     ("1h30m", 5400.0), ('"1.5 m"', 90.0), ("1e2", 100.0), ('"45"', 45.0)],
)
def test_durations(base: Path, value: str, seconds: float) -> None:
    cfg = parse(with_model(base, f"load_timeout: {value}"), base)
    assert cfg.models[0].load_timeout == seconds


@pytest.mark.parametrize(
    ("value", "size"),
    [("1024", 1024), ("8MiB", 8 * 1024 * 1024), ("8MB", 8_000_000), ('"2 GiB"', 2 * 1024**3),
     ("512k", 512_000), ("10b", 10), ("1.5KiB", 1536)],
)
def test_sizes(base: Path, value: str, size: int) -> None:
    cfg = parse(f"server: {{max_body_bytes: {value}}}\n" + MINIMAL, base)
    assert cfg.server.max_body_bytes == size


def test_replicas_integer_and_model_lookup(base: Path) -> None:
    cfg = parse(with_model(base, "replicas: 3"), base)
    assert cfg.model("gemma").replicas == 3
    with pytest.raises(KeyError):
        cfg.model("missing")


def test_command_and_extra_args_forms(base: Path) -> None:
    cfg = parse(with_model(base, "command: [llama-server, -v]\nextra_args: --jinja -ngl 99"), base)
    assert cfg.models[0].command == ("llama-server", "-v")
    assert cfg.models[0].extra_args == ("--jinja", "-ngl", "99")


def test_load_config_resolves_against_its_directory(base: Path) -> None:
    path = base / "supervisor.yaml"
    path.write_text(MINIMAL + "server: {state_dir: st}\n")
    cfg = load_config(path, env={})
    assert cfg.source == path
    assert cfg.models[0].modelfile == base / "gemma.Modelfile"
    assert cfg.server.state_dir == base / "st"
    assert cfg.server.log_dir == base / "logs"


def test_load_config_errors_name_the_file(base: Path) -> None:
    path = base / "supervisor.yaml"
    path.write_text(MINIMAL + "    slots: zero\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}:4: models[0].slots: expected an integer >= 1, got 'zero'"
    with pytest.raises(ConfigError) as info:
        load_config(base / "absent.yaml", env={})
    assert str(info.value) == f"{base / 'absent.yaml'}: no such file"


# --- secrets: env and key files -----------------------------------------------------------------


def test_env_api_keys_are_merged(base: Path) -> None:
    text = "server: {api_keys: [a, b]}\n" + MINIMAL
    cfg = parse(text, base, env={"LLM_SUPERVISOR_API_KEYS": " c, a ,,d "})
    assert cfg.server.api_keys == ("a", "b", "c", "d")


def test_env_tokens_fill_in_when_config_sets_none(base: Path) -> None:
    env = {"LLM_SUPERVISOR_ADMIN_TOKEN": "from-env", "HF_TOKEN": "hf_env"}
    cfg = parse(MINIMAL, base, env=env)
    assert (cfg.server.admin_token, cfg.server.hf_token) == ("from-env", "hf_env")
    cfg = parse("server: {admin_token: own, hf_token: mine}\n" + MINIMAL, base, env=env)
    assert (cfg.server.admin_token, cfg.server.hf_token) == ("own", "mine")


def test_key_files(base: Path) -> None:
    (base / "keys").write_text("# team keys\nk1\n\n  k2  \n")
    (base / "token").write_text("  tok\n")
    text = "server:\n  api_keys: [k0, k1]\n  api_keys_file: keys\n  admin_token_file: token\n"
    cfg = parse(text + MINIMAL, base, env={"LLM_SUPERVISOR_API_KEYS": "k3"})
    assert cfg.server.api_keys == ("k0", "k1", "k2", "k3")
    assert cfg.server.admin_token == "tok"


def test_key_file_errors(base: Path) -> None:
    assert error_of("server:\n  api_keys_file: nope\n" + MINIMAL, base) == (
        f"supervisor.yaml:2: server.api_keys_file: no such file: {base / 'nope'}"
    )
    (base / "empty").write_text("# nothing\n\n")
    assert error_of("server:\n  api_keys_file: empty\n" + MINIMAL, base) == (
        f"supervisor.yaml:2: server.api_keys_file: no keys in {base / 'empty'} "
        "(expected one a line)"
    )
    (base / "blank").write_text("\n \n")
    assert error_of("server:\n  admin_token_file: blank\n" + MINIMAL, base) == (
        "supervisor.yaml:2: server.admin_token_file: expected one line holding the token in "
        f"{base / 'blank'}, got an empty file"
    )
    (base / "multi").write_text("a\nb\n")
    assert error_of("server:\n  admin_token_file: multi\n" + MINIMAL, base) == (
        "supervisor.yaml:2: server.admin_token_file: expected one line holding the token in "
        f"{base / 'multi'}, got several lines"
    )
    (base / "token").write_text("t")
    assert error_of("server:\n  admin_token: x\n  admin_token_file: token\n" + MINIMAL, base) == (
        "supervisor.yaml:3: server.admin_token_file: set admin_token or admin_token_file, not both"
    )


# --- errors -------------------------------------------------------------------------------------


def test_error_replicas_two(base: Path) -> None:
    text = "server:\n  port: 8080\n" + with_model(base, "replicas: two")
    with pytest.raises(ConfigError) as info:
        parse(text, base)
    err = info.value
    assert str(err) == (
        "supervisor.yaml:6: models[0].replicas: expected an integer or 'per-gpu', got 'two'"
    )
    assert (err.file, err.line, err.key) == ("supervisor.yaml", 6, "models[0].replicas")
    assert err.message == "expected an integer or 'per-gpu', got 'two'"
    assert isinstance(err, ValueError)


def test_error_replicas_zero(base: Path) -> None:
    assert error_of(with_model(base, "replicas: 0"), base) == (
        "supervisor.yaml:4: models[0].replicas: expected an integer >= 1 or 'per-gpu', got 0"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("slots: x", "models[0].slots: expected an integer >= 1, got 'x'"),
        ("slots: 0", "models[0].slots: expected an integer >= 1, got 0"),
        ("slots: 2.5", "models[0].slots: expected an integer >= 1, got 2.5"),
        ("ctx: [1]", "models[0].ctx: expected an integer >= 1, got a list"),
        ("warmup: maybe", "models[0].warmup: expected true or false, got 'maybe'"),
        ("engine: vllm", "models[0].engine: expected one of llama-server, llama-cpp-python, "
                         "ollama, got 'vllm'"),
        ("engine: olama", "models[0].engine: expected one of llama-server, llama-cpp-python, "
                          "ollama, got 'olama' (did you mean 'ollama'?)"),
        ("gpus: 0", "models[0].gpus: expected a list of GPU indexes, got 0"),
        ("gpus: [0, -1]", "models[0].gpus[1]: expected an integer >= 0, got -1"),
        ("gpus: [1, 1]", "models[0].gpus[1]: duplicate GPU index 1"),
        ("env: {1BAD: x}", "models[0].env.1BAD: expected an environment variable name "
                           "(letters, digits, _)"),
        ("env: {A: null}", "models[0].env.A: expected a string, got null"),
        ("env: [a]", "models[0].env: expected a mapping, got a list"),
        ("command: 'a \"b'", "models[0].command: cannot split into arguments: "
                             "No closing quotation"),
        ("extra_args: [a, [b]]", "models[0].extra_args[1]: expected a string, got a list"),
        ("health: {interval: 0}", "models[0].health.interval: expected a positive duration, "
                                  "got 0"),
        ("health: {failure: 1}", "models[0].health.failure: unknown key "
                                 "(did you mean 'failures'?)"),
        ("affinity_margin: -1", "models[0].affinity_margin: expected a number >= 0, got -1"),
        ("canary_interval: -1s", "models[0].canary_interval: expected a duration (seconds, or a "
                                 "string like '500ms', '30s', '5m'), got '-1s'"),
        ("stall_timeout: 0", "models[0].stall_timeout: expected a positive duration, got 0"),
        ("queue_timeout: soon", "models[0].queue_timeout: expected a duration (seconds, or a "
                                "string like '500ms', '30s', '5m'), got 'soon'"),
        ("load_timeout: .inf", "models[0].load_timeout: expected a duration (seconds, or a "
                               "string like '500ms', '30s', '5m'), got .inf"),
    ],
)
def test_model_value_errors(base: Path, line: str, message: str) -> None:
    assert error_of(with_model(base, line), base) == f"supervisor.yaml:4: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: 0", "server.port: expected an integer between 1 and 65535, got 0"),
        ("port: 70000", "server.port: expected an integer between 1 and 65535, got 70000"),
        ("port: '80'", "server.port: expected an integer between 1 and 65535, got '80'"),
        ("host: ''", "server.host: expected a non-empty string, got ''"),
        ("drain_timeout: soon", "server.drain_timeout: expected a duration (seconds, or a string "
                                "like '500ms', '30s', '5m'), got 'soon'"),
        ("max_body_bytes: lots", "server.max_body_bytes: expected a size in bytes (an integer, or "
                                 "a string like '8MiB' or '8MB'), got 'lots'"),
        ("max_body_bytes: 0", "server.max_body_bytes: expected a size in bytes (an integer, or "
                              "a string like '8MiB' or '8MB'), got 0"),
        ("log_prompts: 1", "server.log_prompts: expected true or false, got 1"),
        ("header_timeout: 0", "server.header_timeout: expected a positive duration, got 0"),
        ("body_timeout: -1", "server.body_timeout: expected a positive duration, got -1"),
        ("api_keys: abc", "server.api_keys: expected a list of strings, got 'abc'"),
        ("hf_endpoint: ftp://x", "server.hf_endpoint: expected an http:// or https:// URL, "
                                 "got 'ftp://x'"),
        ("max_failures: 0", "server.max_failures: expected an integer >= 1, got 0"),
        ("backoff_max: 1s", "server.backoff_max: backoff_max (1s) must not be less than "
                            "backoff_initial (5s)"),
        ("prot: 1", "server.prot: unknown key (did you mean 'port'?)"),
    ],
)
def test_server_value_errors(base: Path, text: str, message: str) -> None:
    config = f"server:\n  backoff_initial: 5s\n  {text}\n" + MINIMAL
    assert error_of(config, base) == f"supervisor.yaml:3: {message}"


def test_error_unknown_key_with_suggestion(base: Path) -> None:
    assert error_of(with_model(base, "replica: 2"), base) == (
        "supervisor.yaml:4: models[0].replica: unknown key (did you mean 'replicas'?)"
    )
    assert error_of("model:\n  - name: x\n", base) == (
        "supervisor.yaml:1: model: unknown key (did you mean 'models'?)"
    )


def test_error_unknown_key_without_suggestion_lists_known_keys(base: Path) -> None:
    assert error_of("zzz: 1\n" + MINIMAL, base) == (
        "supervisor.yaml:1: zzz: unknown key (known keys: server, defaults, models)"
    )


def test_error_duplicate_model_name(base: Path) -> None:
    text = MINIMAL + "  - name: gemma\n    modelfile: other.Modelfile\n"
    assert error_of(text, base) == (
        "supervisor.yaml:4: models[1].name: duplicate model name 'gemma' (first defined at line 2)"
    )


def test_error_bad_model_name(base: Path) -> None:
    text = "models:\n  - name: my model\n    modelfile: gemma.Modelfile\n"
    assert error_of(text, base) == (
        "supervisor.yaml:2: models[0].name: expected a name of letters, digits and . _ : -, "
        "got 'my model'"
    )


def test_error_missing_modelfile(base: Path) -> None:
    text = "models:\n  - name: a\n    modelfile: missing/x.Modelfile\n"
    assert error_of(text, base) == (
        f"supervisor.yaml:3: models[0].modelfile: no such file: {base / 'missing' / 'x.Modelfile'}"
    )
    text = "models:\n  - name: a\n    modelfile: .\n"
    assert error_of(text, base) == f"supervisor.yaml:3: models[0].modelfile: not a file: {base}"


def test_error_model_without_required_keys(base: Path) -> None:
    assert error_of("models:\n  - name: a\n    slots: 1\n", base) == (
        "supervisor.yaml:2: models[0].modelfile: missing (every model needs a name and a modelfile)"
    )
    assert error_of("models:\n  - modelfile: gemma.Modelfile\n", base) == (
        "supervisor.yaml:2: models[0].name: missing (every model needs a name and a modelfile)"
    )
    assert error_of("models:\n  - gemma\n", base) == (
        "supervisor.yaml:2: models[0]: expected a mapping, got 'gemma'"
    )


def test_error_models_missing_or_empty(base: Path) -> None:
    assert error_of("server: {port: 1}\n", base) == (
        "supervisor.yaml: models: missing (at least one model is required)"
    )
    assert error_of("", base) == "supervisor.yaml: models: missing (at least one model is required)"
    assert error_of("models: []\n", base) == (
        "supervisor.yaml:1: models: expected at least one model, got an empty list"
    )
    assert error_of("models: {name: a}\n", base) == (
        "supervisor.yaml:1: models: expected a list of models, got a mapping"
    )


def test_error_top_level_not_a_mapping(base: Path) -> None:
    assert error_of("- a\n- b\n", base) == "supervisor.yaml:1: expected a mapping, got a list"


def test_error_defaults(base: Path) -> None:
    assert error_of("defaults:\n  name: x\n" + MINIMAL, base) == (
        "supervisor.yaml:2: defaults.name: a name cannot be a default; set it on each model"
    )
    assert error_of("defaults:\n  slot: 2\n" + MINIMAL, base) == (
        "supervisor.yaml:2: defaults.slot: unknown key (did you mean 'slots'?)"
    )


def test_error_yaml_syntax_line(base: Path) -> None:
    text = "server:\n  port: 8080\n  host: [127.0.0.1\nmodels: []\n"
    with pytest.raises(ConfigError) as info:
        parse(text, base)
    assert info.value.line == 4
    assert str(info.value).startswith("supervisor.yaml:4: invalid YAML: ")
    text = "server:\n  port: 8080\n bad: indent\n"
    assert error_of(text, base) == (
        "supervisor.yaml:3: invalid YAML: expected <block end>, but found '<block mapping start>'"
    )


def test_error_yaml_duplicate_key(base: Path) -> None:
    assert error_of("server:\n  port: 1\n  port: 2\n" + MINIMAL, base) == (
        "supervisor.yaml:3: server.port: duplicate key (first at line 2)"
    )


def test_error_without_key_or_line_formats() -> None:
    assert str(ConfigError("f.yaml", None, "", "boom")) == "f.yaml: boom"
    assert str(ConfigError("f.yaml", 2, "", "boom")) == "f.yaml:2: boom"
    assert str(ConfigError("f.yaml", None, "k", "boom")) == "f.yaml: k: boom"


# --- the embedded default and the shipped example -----------------------------------------------


def test_default_config_cpu_only(tmp_path: Path) -> None:
    cfg = default_config(0, tmp_path, env={})
    assert cfg.source is None
    (model,) = cfg.models
    assert model == ModelConfig(
        name="gemma3-270m",
        modelfile=REPO / "modelfiles" / "gemma3-270m.Modelfile",
        engine="llama-server",
        replicas=2,
        slots=2,
    )
    assert model.modelfile.is_file()
    assert cfg.server.state_dir == tmp_path / "state"
    assert cfg.server.log_dir == tmp_path / "logs"
    assert cfg.server.cache_dir == REPO / "cache"
    assert cfg.server.port == 8080


def test_default_config_with_gpus_and_env(tmp_path: Path) -> None:
    cfg = default_config(2, tmp_path, env={"LLM_SUPERVISOR_API_KEYS": "a,b"})
    assert cfg.model("gemma3-270m").replicas == "per-gpu"
    assert cfg.server.api_keys == ("a", "b")


def test_shipped_example_parses_and_mentions_every_key() -> None:
    path = REPO / "supervisor.example.yaml"
    cfg = load_config(path, env={})
    assert cfg.model("gemma3-270m").modelfile == REPO / "modelfiles" / "gemma3-270m.Modelfile"
    text = path.read_text()
    server_keys = [*config_module._SERVER_SPEC]
    model_keys = [*config_module._MODEL_SPEC]
    for key in server_keys + model_keys:
        assert re.search(rf"^\s*(#\s*)?(- )?{key}:", text, re.MULTILINE), key


def test_field_tables_cover_the_dataclasses() -> None:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(config_module._MODEL_SPEC) == model_fields
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    extra = {"api_keys_file", "admin_token_file"}
    assert set(config_module._SERVER_SPEC) == server_fields | extra


def test_systemd_directories_are_the_default_dirs(tmp_path: Path) -> None:
    (tmp_path / "m.Modelfile").write_text("FROM ./m.gguf\n")
    text = "models:\n  - name: m\n    modelfile: m.Modelfile\n"
    env = {"STATE_DIRECTORY": "/var/lib/llm-supervisor", "CACHE_DIRECTORY": "/var/cache/a:/b",
           "LOGS_DIRECTORY": "/var/log/llm-supervisor"}
    server = parse_config(text, base_dir=tmp_path, env=env).server
    assert server.state_dir == Path("/var/lib/llm-supervisor")
    assert server.cache_dir == Path("/var/cache/a")
    assert server.log_dir == Path("/var/log/llm-supervisor")
    explicit = parse_config("server:\n  state_dir: st\n" + text, base_dir=tmp_path, env=env)
    assert explicit.server.state_dir == tmp_path / "st"
    plain = parse_config(text, base_dir=tmp_path, env={}).server
    assert plain.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("setting", "cpus", "pinned"),
    [("auto", 2, False), ("auto", 3, False), ("auto", 4, True), ("auto", 64, True),
     ("always", 2, True), ("never", 64, False)],
)
def test_pin_cpus(base: Path, setting: str, cpus: int, pinned: bool) -> None:
    cfg = parse(f"server: {{pin_cpus: {setting}}}\n" + MINIMAL, base)
    assert cfg.server.pin_cpus == setting
    assert pins_cpus(cfg.server, cpus) is pinned


def test_pin_cpus_names_the_choices(base: Path) -> None:
    assert error_of("server:\n  pin_cpus: off\n" + MINIMAL, base) == (
        "supervisor.yaml:2: server.pin_cpus: expected one of auto, always, never, got off")
