"""Reload under load, refused bad edits, sd_notify, and /metrics from the running daemon."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon_proc import DEMO_MODELFILE, DaemonProc, fake_model, wait_gone

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    modelfile = tmp_path / "fake.Modelfile"
    modelfile.write_text(DEMO_MODELFILE.read_text())
    d = DaemonProc(tmp_path, [fake_model(modelfile=str(modelfile),
                                         fake_args=("--fake-token-rate", "100"))])
    yield d
    if d.proc is not None and d.proc.poll() is None:
        pids = d.descendants()
        d.stop()
        assert wait_gone(pids) == []


async def steady_load(url: str, stop: asyncio.Event) -> dict[str, Any]:
    """Four clients, alternating streaming and not, until told to stop."""
    counts: dict[str, Any] = {"ok": 0, "failed": [], "streams": 0}

    async def client(n: int, s: aiohttp.ClientSession) -> None:
        i = 0
        while not stop.is_set():
            stream = (i + n) % 2 == 0
            i += 1
            try:
                async with s.post(url + "/v1/chat/completions",
                                  json={**CHAT, "stream": stream}) as r:
                    body = await r.read()
                    if r.status != 200 or (stream and not body.rstrip().endswith(b"[DONE]")):
                        counts["failed"].append((r.status, body[-200:]))
                    else:
                        counts["ok"] += 1
                        counts["streams"] += stream
            except aiohttp.ClientError as exc:
                counts["failed"].append(("exception", repr(exc)))

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(n, s) for n in range(4)))
    return counts


def test_reload_of_a_changed_model_under_load_loses_nothing(daemon: DaemonProc,
                                                            tmp_path: Path) -> None:
    daemon.start()
    daemon.wait_ready()
    daemon.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="READY")
    before = {r["id"]: r["pid"] for r in daemon.replicas()}
    assert sorted(before) == ["fake/0", "fake/1"]

    async def scenario() -> tuple[dict[str, Any], float]:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(daemon.url, stop))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        # a changed PARAMETER in the Modelfile: the watcher picks it up, the model is rolled
        mf = tmp_path / "fake.Modelfile"
        mf.write_text(mf.read_text().replace("temperature 0.7", "temperature 0.2"))
        await asyncio.to_thread(
            daemon.wait,
            lambda s: sorted(r["id"] for r in s["replicas"]) == ["fake/2", "fake/3"]
            and all(r["state"] == "READY" for r in s["replicas"]),
            60.0, "rolled to new replicas")
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        stop.set()
        return await load, took

    counts, took = asyncio.run(scenario())
    print(f"reload under load: {counts['ok']} requests ({counts['streams']} streams) ok, "
          f"{len(counts['failed'])} failed; roll took {took:.1f}s")
    assert counts["failed"] == []
    assert counts["ok"] > 20
    status = daemon.status()
    assert status["config"]["reload_error"] is None
    assert any(e["kind"] == "reload" and "changed" in e["message"] for e in status["events"])
    assert wait_gone(list(before.values())) == []


def test_bad_edit_is_refused_and_the_running_config_stays(daemon: DaemonProc) -> None:
    daemon.start()
    daemon.wait_ready()
    before = sorted((r["id"], r["pid"]) for r in daemon.replicas())
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("replicas: 2", "replicas: two"))
    status = daemon.wait(lambda s: s["config"]["reload_error"] is not None,
                         what="reload refused")
    assert "models[0].replicas: expected an integer or 'per-gpu', got 'two'" in \
        status["config"]["reload_error"]
    assert any(e["kind"] == "reload_error" for e in status["events"])
    assert sorted((r["id"], r["pid"]) for r in status["replicas"]) == before

    async def admin() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/admin/reload") as r:
            return r.status, await r.json()

    # the admin API is closed without a token: refused before anything is read
    code, body = asyncio.run(admin())
    assert code == 403 and "admin" in body["error"]["message"]
    # a fixed file is accepted again
    daemon.config_path.write_text(text)
    daemon.wait(lambda s: s["config"]["reload_error"] is None, what="good reload")
    assert sorted((r["id"], r["pid"]) for r in daemon.replicas()) == before


def test_sd_notify_messages_and_sighup_reload(daemon: DaemonProc, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain(until: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            if any(until in m for m in messages):
                return
        raise AssertionError(f"no {until!r} in {messages}")

    try:
        daemon.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
        drain("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready and "replicas ready" in ready
        drain("WATCHDOG=1")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        drain("RELOADING=1")
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        daemon.proc.send_signal(signal.SIGTERM)
        drain("STOPPING=1")
        assert daemon.proc.wait(30) == 0
        # the engines never saw the daemon's notify socket
        log = daemon.log_text()
        assert "NOTIFY_SOCKET" not in log
    finally:
        sock.close()


def test_metrics_exposition_parses(daemon: DaemonProc) -> None:
    daemon.start()
    daemon.wait_ready()
    daemon.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")

    async def go() -> str:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                async with s.post(daemon.url + "/v1/chat/completions",
                                  json={**CHAT, "stream": stream}) as r:
                    await r.read()
            async with s.get(daemon.url + "/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                return await r.text()

    families = {f.name: f for f in text_string_to_metric_families(asyncio.run(go()))}
    requests = {tuple(sorted(s.labels.items())): s.value
                for s in families["llm_supervisor_requests"].samples
                if s.name == "llm_supervisor_requests_total"}
    key = (("endpoint", "/v1/chat/completions"), ("model", "fake"), ("status", "200"))
    assert requests[key] == 2
    completion = [s.value for s in families["llm_supervisor_completion_tokens"].samples
                  if s.name.endswith("_total")]
    assert completion == [16]
    states = [s for s in families["llm_supervisor_replica_state"].samples
              if s.labels["state"] == "READY" and s.value == 1]
    assert len(states) == 2
    ttft = [s for s in families["llm_supervisor_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")]
    assert ttft and ttft[0].value == 2
    waits = [s for s in families["llm_supervisor_queue_wait_seconds"].samples
             if s.name.endswith("_count")]
    assert waits and waits[0].value == 2


def test_sigterm_finishes_in_flight_streams_then_exits_0(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, [fake_model(replicas=1, fake_args=("--fake-token-rate", "10"))])
    d.start()
    d.wait_ready()
    pids = d.child_pids()

    async def go() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(d.url + "/v1/chat/completions",
                              json={**CHAT, "max_tokens": 20, "stream": True}) as r:
                first = await r.content.readany()
                assert d.proc is not None
                d.proc.send_signal(signal.SIGTERM)  # mid-stream
                return first + await r.read()

    body = asyncio.run(go())
    assert body.rstrip().endswith(b"[DONE]")
    assert body.count(b'"content"') >= 20
    assert d.stop() == 0
    assert wait_gone(pids) == []
    assert "stopped every replica" in d.log_text()
