"""End-to-end tests: the real llama.cpp engines and the real demo model."""

from __future__ import annotations

import importlib.util
import os

import pytest


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
