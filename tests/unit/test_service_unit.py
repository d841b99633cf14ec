"""The shipped systemd unit: the directives the daemon and the install notes rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "llm-supervisor.service"

# CONTRACTS.md defaults: ServerConfig.drain_timeout and ModelConfig.stop_grace.
DRAIN_TIMEOUT = 30.0
STOP_GRACE = 10.0


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) pairs in order; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def seconds(value: str) -> float:
    """A systemd time span like '60', '90s', '15min', '1min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for part in value.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(number) * units[part[len(number) :]]
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def test_parser_handles_repeats_and_continuations() -> None:
    parsed = parse_unit("[A]\n# c\nX=1\nX=2\nY=a \\\n  b\n")
    assert parsed == {"A": [("X", "1"), ("X", "2"), ("Y", "a b")]}


def test_sections(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_notify_and_watchdog(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) == 30


def test_exec_lines(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "ExecStart") == (
        "/opt/llm-supervisor/.venv/bin/llm-supervisor serve -c /etc/llm-supervisor/supervisor.yaml"
    )
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    # optional ("-") and privileged ("+"): the only thing run outside the sandbox
    for pre in values(unit, "Service", "ExecStartPre"):
        assert pre.startswith(("-+", "+-")), pre


def test_restart_and_stop(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    assert seconds(one(unit, "Service", "RestartSec")) == 5
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert seconds(one(unit, "Service", "TimeoutStopSec")) >= DRAIN_TIMEOUT + STOP_GRACE
    assert seconds(one(unit, "Service", "TimeoutStartSec")) >= 300  # a model's load_timeout


def test_user_and_directories(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "User") == "llm-supervisor"
    assert one(unit, "Service", "Group") == "llm-supervisor"
    assert set(one(unit, "Service", "SupplementaryGroups").split()) == {"video", "render"}
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert one(unit, "Service", key) == "llm-supervisor"
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    assert env["LLM_SUPERVISOR_STATE_DIR"] == "%S/llm-supervisor"
    assert env["LLM_SUPERVISOR_CACHE_DIR"] == "%C/llm-supervisor"
    assert env["LLM_SUPERVISOR_LOG_DIR"] == "%L/llm-supervisor"
    assert one(unit, "Service", "LimitNOFILE") == "65536"


@pytest.mark.parametrize(
    "key",
    [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ],
)
def test_hardening_on(unit: dict[str, list[tuple[str, str]]], key: str) -> None:
    assert one(unit, "Service", key) == "yes"


def test_hardening_values(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "SystemCallArchitectures") == "native"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""


def test_cuda_still_works(unit: dict[str, list[tuple[str, str]]]) -> None:
    # PrivateDevices=yes hides /dev/nvidia*; CUDA's JIT needs W+X memory.
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])
    assert values(unit, "Service", "MemoryDenyWriteExecute") in ([], ["no"])
    assert values(unit, "Service", "ProcSubset") in ([], ["all"])  # NVML reads /proc/driver
    # DevicePolicy=closed: pseudo devices plus DeviceAllow=; the NVIDIA nodes are
    # allowed by driver group (nvidiaN, nvidiactl, -modeset, -uvm, -uvm-tools, caps)
    assert one(unit, "Service", "DevicePolicy") == "closed"
    allow = dict(v.split() for v in values(unit, "Service", "DeviceAllow"))
    assert "r" in allow["char-nvidia*"] and "w" in allow["char-nvidia*"]


def test_no_duplicate_single_valued_keys(unit: dict[str, list[tuple[str, str]]]) -> None:
    repeatable = {"Environment", "DeviceAllow", "ExecStartPre", "After", "Wants"}
    keys = [k for k, _ in unit["Service"] if k not in repeatable]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
