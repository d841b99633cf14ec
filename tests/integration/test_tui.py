"""`llm-supervisor top` against a fake daemon on port 0, driven with a Textual pilot."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from textual.widgets import DataTable, Footer

from supervisor.tui import TopApp

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "status_sample.json"
TOKEN = "s3cret-admin"


class FakeDaemon:
    """Serves a fixed /status and records admin POSTs; can stop and come back on its port."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.posts: list[tuple[str, str | None]] = []
        self.status_auth: set[str | None] = set()
        self.require_key = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.status_auth.add(auth)
        if self.require_key and auth != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "invalid API key"}}, status=401)
        return web.json_response(self.status)

    async def _admin(self, request: web.Request) -> web.Response:
        self.posts.append((request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            error = {"message": "invalid or missing admin token"}
            return web.json_response({"error": error}, status=401)
        return web.json_response({"ok": True}, status=202)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_post("/admin/replicas/{id}/{verb}", self._admin)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for condition while the app runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def row_keys(app: TopApp, table_id: str) -> list[str | None]:
    return [key.value for key in app.query_one(table_id, DataTable).rows]


@pytest.fixture
async def daemon() -> Any:
    fake = FakeDaemon(json.loads(SAMPLE.read_text()))
    await fake.start()
    yield fake
    await fake.stop()


async def test_top_shows_acts_and_survives_restarts(daemon: FakeDaemon, tmp_path: Path) -> None:
    app = TopApp(daemon.url, admin_token=TOKEN, interval=0.1)
    async with app.run_test(size=(150, 45)) as pilot:
        await until(lambda: app.query_one("#replicas", DataTable).row_count == 4, "replica rows")
        assert row_keys(app, "#replicas") == [
            "gemma3-270m/0",
            "gemma3-270m/1",
            "llama3.3-70b/0",
            "qwen2.5-coder-7b/0",
        ]
        replicas = app.query_one("#replicas", DataTable)
        assert [str(c) for c in replicas.get_row("llama3.3-70b/0")][:4] == [
            "llama3.3-70b/0",
            "llama3.3-70b",
            "gpu 0,1",
            "READY",
        ]
        assert str(replicas.get_row("qwen2.5-coder-7b/0")[3]) == "BACKOFF"
        assert row_keys(app, "#gpus") == ["gpu-0", "gpu-1"]
        assert row_keys(app, "#queues") == ["gemma3-270m", "llama3.3-70b", "qwen2.5-coder-7b"]
        assert app.query_one("#events", DataTable).row_count == 7
        assert "ready" in app.header_text and daemon.url in app.header_text
        assert "up 1h02m" in app.header_text
        assert daemon.status_auth == {f"Bearer {TOKEN}"}  # /status may need a key too

        await until(lambda: len(app.query_one(Footer).children) >= 3, "footer keys")
        await pilot.pause()
        app.save_screenshot("top.svg", str(tmp_path))
        svg = (tmp_path / "top.svg").read_text()
        assert "qwen2.5-coder-7b/0" in svg.replace("&#160;", " ")
        assert "Restart" in svg  # the footer's key hints
        if os.environ.get("LLM_SUPERVISOR_UPDATE_SCREENSHOT"):
            (ROOT / "docs").mkdir(exist_ok=True)
            app.save_screenshot("top.svg", str(ROOT / "docs"))

        # r restarts the selected replica (the second row), d drains it
        await pilot.press("down")
        assert app.selected_replica() == "gemma3-270m/1"
        await pilot.press("r")
        await until(lambda: len(daemon.posts) == 1, "restart POST")
        assert daemon.posts[0] == ("/admin/replicas/gemma3-270m:1/restart", f"Bearer {TOKEN}")
        await pilot.press("down", "d")
        await until(lambda: len(daemon.posts) == 2, "drain POST")
        assert daemon.posts[1] == ("/admin/replicas/llama3.3-70b:0/drain", f"Bearer {TOKEN}")

        # the selection survives a refresh with a changed replica list
        daemon.status = {**daemon.status, "replicas": daemon.status["replicas"][1:]}
        await until(lambda: len(row_keys(app, "#replicas")) == 3, "shorter replica list")
        assert app.selected_replica() == "llama3.3-70b/0"

        # the daemon goes away: the app keeps running and says so
        await daemon.stop()
        await until(lambda: "unreachable" in app.header_text, "unreachable header")
        assert "(retrying)" in app.header_text
        assert app.is_running
        assert row_keys(app, "#replicas")  # the last snapshot stays on screen

        # ... and comes back on the same port
        daemon.status["ready"] = False
        await daemon.start()
        await until(lambda: "unreachable" not in app.header_text, "recovery")
        assert "not ready" in app.header_text

        await pilot.press("q")
        await until(lambda: not app.is_running, "quit")


async def test_top_without_token_reports_refusal(daemon: FakeDaemon) -> None:
    app = TopApp(daemon.url, admin_token=None, interval=0.1)
    async with app.run_test(size=(150, 45)) as pilot:
        await until(lambda: app.query_one("#replicas", DataTable).row_count == 4, "replica rows")
        await pilot.press("r")
        await until(lambda: len(daemon.posts) == 1, "restart POST")
        assert daemon.posts[0] == ("/admin/replicas/gemma3-270m:0/restart", None)
        assert daemon.status_auth == {None}
        # a daemon with api_keys refuses /status without one: said so, not "unreachable"
        daemon.require_key = True
        await until(lambda: "HTTP 401" in app.header_text, "refusal in the header")
        assert "unreachable" not in app.header_text
        assert "admin token or API key" in app.header_text
        await pilot.press("q")


async def test_top_cpu_only_host(daemon: FakeDaemon) -> None:
    daemon.status = {**daemon.status, "gpus": [], "cpus": 16}
    app = TopApp(daemon.url, interval=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(lambda: app.status is not None, "first status")
        cpus = app.query_one("#cpus")
        assert cpus.display and not app.query_one("#gpus").display
        assert "CPU-only host: 16 cores" in str(cpus.render())
        await pilot.press("q")


async def test_top_starts_while_daemon_is_down() -> None:
    fake = FakeDaemon(json.loads(SAMPLE.read_text()))
    await fake.start()
    await fake.stop()  # a port nobody listens on now
    app = TopApp(fake.url, interval=0.1)
    async with app.run_test() as pilot:
        await until(lambda: "unreachable" in app.header_text, "unreachable header")
        assert "cannot connect" in app.header_text
        assert app.query_one("#replicas", DataTable).row_count == 0
        await fake.start()
        try:
            await until(lambda: app.query_one("#replicas", DataTable).row_count == 4, "rows")
        finally:
            await fake.stop()
        await pilot.press("q")
