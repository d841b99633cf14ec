"""The daemon supervising fake engines: each failure mode, failover, and no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import PIN_MIN_CPUS
from tests.integration.daemon_proc import DaemonProc, engine_call, fake_model, wait_gone

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProc] = []

    def make(models: list[dict[str, Any]], **server: Any) -> DaemonProc:
        d = DaemonProc(tmp_path, models, **server).start()
        started.append(d)
        return d

    yield make
    while _CLIENTS:
        _CLIENTS.pop().close()
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            pids = d.descendants()
            d.stop()
            assert wait_gone(pids) == [], "children outlived the daemon"


_CLIENTS: list[openai.OpenAI] = []


def client(d: DaemonProc, **kw: Any) -> openai.OpenAI:
    """An OpenAI client on the daemon; closed when the test ends."""
    c = openai.OpenAI(base_url=d.url + "/v1", api_key=kw.pop("api_key", "none"),
                      max_retries=0, timeout=30, **kw)
    _CLIENTS.append(c)
    return c


def by_id(status: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in status["replicas"] if r["id"] == rid)


def test_ready_serves_and_both_replicas_take_traffic(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(fake_args=("--fake-token-rate", "50"))], pin_cpus="always")
    d.wait_ready()
    d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")
    c = client(d)

    async def burst() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            async def one() -> dict[str, Any]:
                async with s.post(d.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    out: dict[str, Any] = await r.json()
                    return out
            return await asyncio.gather(*(one() for _ in range(8)))

    results = asyncio.run(burst())
    assert all(r["choices"][0]["message"]["content"].startswith("tok0") for r in results)
    served = {r["system_fingerprint"] for r in results}
    assert len(served) == 2, served
    models = c.models.list()
    assert [m.id for m in models.data] == ["fake"]
    status = d.status()
    assert status["models"][0]["requests"] == 8
    assert status["models"][0]["tokens"]["completion"] == 8 * 6
    # the exact command line and environment each child got
    for rep in status["replicas"]:
        stats = engine_call(rep["port"], "/fake/stats")
        assert stats["config"]["host"] == "127.0.0.1"
        assert stats["config"]["parallel"] == 2
        assert stats["config"]["threads"] == 1
        assert stats["config"]["n_gpu_layers"] == "0"
        assert stats["config"]["metrics"] is True
        assert stats["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert stats["config"]["alias"] == "fake"
    assert sorted(tuple(r["cpus"]) for r in status["replicas"]) == [(0,), (1,)]
    for rep in status["replicas"]:
        assert psutil.Process(rep["pid"]).cpu_affinity() == rep["cpus"]


def test_auto_pinning_follows_the_host_size(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model()])
    d.wait_ready()
    d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")
    every = sorted(os.sched_getaffinity(0))
    pinned = len(every) >= PIN_MIN_CPUS  # a small host is left to the kernel's balancer
    for rep in d.status()["replicas"]:
        assert bool(rep["cpus"]) is pinned
        assert psutil.Process(rep["pid"]).cpu_affinity() == (rep["cpus"] if pinned else every)
        threads = engine_call(rep["port"], "/fake/stats")["config"]["threads"]
        assert threads == max(1, len(every) // 2)  # the thread budget stays the CPU set's


def test_stream_relays_chunks_as_they_come(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, fake_args=("--fake-token-rate", "10"))])
    d.wait_ready()
    stream = client(d).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True)
    t0 = time.monotonic()
    arrivals = []
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - t0)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.startswith("tok0 tok1")
    # 10 tokens at 10/s take about a second; the first chunk came long before the last
    assert arrivals[-1] - arrivals[1] > 0.5
    assert arrivals[1] < arrivals[-1] / 2


def test_llama_server_answers_a_whole_request_whole(daemon_factory: Any) -> None:
    """A non-streaming request is not streamed from llama-server (its /slots shows
    progress instead); tokens and time to first token are still accounted."""
    d = daemon_factory([fake_model(replicas=1, fake_args=("--fake-token-rate", "20"))])
    d.wait_ready()
    c = client(d)
    out = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                    max_tokens=6)
    content = out.choices[0].message.content
    assert content is not None and content.startswith("tok0")
    assert out.usage is not None and out.usage.completion_tokens == 6
    with urllib.request.urlopen(d.url + "/metrics", timeout=5) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}

    def total(family: str, suffix: str) -> float:
        return sum(s.value for s in families[family].samples if s.name.endswith(suffix))

    assert total("llm_supervisor_time_to_first_token_seconds", "_count") == 1
    assert total("llm_supervisor_request_duration_seconds", "_sum") >= 0.3
    assert total("llm_supervisor_time_to_first_token_seconds", "_sum") < 0.2
    chunks = list(c.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "y"}], max_tokens=2, stream=True))
    assert chunks
    port = d.replicas()[0]["port"]
    recent = [r for r in engine_call(port, "/fake/stats")["recent"]
              if r["path"] == "/v1/chat/completions"]
    assert [r["stream"] for r in recent[-2:]] == [False, True]
    model = d.status()["models"][0]
    assert model["tokens"]["completion"] == 8


def test_openai_errors_are_shaped(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1)], max_body_bytes=4096)
    d.wait_ready()
    c = client(d)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "served models: fake" in str(nf.value)

    async def raw() -> list[tuple[int, dict[str, Any]]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for body in (b"{not json", b"[1,2]", json.dumps({"messages": []}).encode(),
                         json.dumps({"model": "fake"}).encode(),
                         json.dumps({"model": "fake", "messages": "hi"}).encode(),
                         json.dumps({"model": "fake", "messages": [{"content": "x"}]}).encode(),
                         json.dumps({"model": "fake", "prompt": "x" * 8000}).encode()):
                async with s.post(d.url + "/v1/chat/completions", data=body) as r:
                    out.append((r.status, await r.json()))
            async with s.get(d.url + "/v1/nothing") as r:
                out.append((r.status, await r.json()))
        return out

    results = asyncio.run(raw())
    assert [status for status, _ in results] == [400, 400, 400, 400, 400, 400, 413, 404]
    for _, body in results:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "missing required parameter: 'messages'" in results[3][1]["error"]["message"]


def test_hung_engine_is_replaced_and_request_retried(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(stall_timeout=1.0, fake_args=("--fake-token-rate", "100"))])
    d.wait_ready()
    d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")
    victim = d.replicas()[0]
    engine_call(victim["port"], "/fake/control", {"hang": True})
    c = client(d)
    # every request succeeds: the ones sent to the hung replica are retried elsewhere
    for _ in range(4):
        out = c.chat.completions.create(model="fake", messages=[{"role": "user",
                                                                 "content": "x"}],
                                        max_tokens=3)
        assert out.choices[0].message.content
    s = d.wait(lambda s: by_id(s, victim["id"])["restarts"] >= 1
               and by_id(s, victim["id"])["state"] == "READY", what="victim replaced")
    replaced = by_id(s, victim["id"])
    assert replaced["pid"] != victim["pid"]
    assert any(e["kind"] == "hang" and e["cause"] == "stall" for e in s["events"])
    assert s["models"][0]["errors"] == 0
    assert wait_gone([victim["pid"]]) == []


def test_health_hang_detected(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1)])
    d.wait_ready()
    victim = d.replicas()[0]
    engine_call(victim["port"], "/fake/control", {"hang_health": True})
    t0 = time.monotonic()
    s = d.wait(lambda s: any(e["kind"] == "hang" and e["cause"] == "health"
                             for e in s["events"]), what="health hang")
    assert time.monotonic() - t0 < 5
    d.wait(lambda s: s["replicas"][0]["state"] == "READY" and s["replicas"][0]["restarts"] == 1,
           what="replaced")
    assert s["replicas"][0]["id"] == victim["id"]


def test_wedged_generation_with_healthy_health_caught_by_canary(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, canary_interval=0.5, canary_timeout=1.0)])
    d.wait_ready()
    victim = d.replicas()[0]
    engine_call(victim["port"], "/fake/control", {"hang": True})  # /health stays 200
    s = d.wait(lambda s: any(e["kind"] == "hang" and e["cause"] == "canary"
                             for e in s["events"]), what="canary hang")
    # the health probe never failed: only the canary could see this
    assert not any(e["cause"] == "health" for e in s["events"])
    s = d.wait(lambda s: s["replicas"][0]["restarts"] == 1
               and s["replicas"][0]["state"] == "READY", what="replaced")
    assert s["replicas"][0]["pid"] != victim["pid"]


def test_sigstop_caught_at_once(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1)])
    d.wait_ready()
    victim = d.replicas()[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    d.wait(lambda s: s["replicas"][0]["state"] != "READY", what="stop noticed")
    assert time.monotonic() - t0 < 2.0
    s = d.wait(lambda s: s["replicas"][0]["state"] == "READY", what="replaced")
    assert s["replicas"][0]["pid"] != victim["pid"]
    assert any(e["cause"] == "process" for e in s["events"])
    assert wait_gone([victim["pid"]]) == []


def test_crash_mid_stream_ends_with_error_event(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, fake_args=(
        "--fake-crash-mid-stream", "1", "--fake-token-rate", "20"))])
    d.wait_ready()
    stream = client(d).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got.append(chunk)
    assert got, "some chunks arrived before the crash"
    assert "failed mid-stream" in str(err.value) or "ended the stream early" in str(err.value)
    d.wait(lambda s: s["replicas"][0]["restarts"] >= 1 and s["replicas"][0]["state"] == "READY",
           what="crashed replica replaced")


def test_slow_load_and_never_ready_goes_fatal_with_log_tail(daemon_factory: Any) -> None:
    d = daemon_factory([
        fake_model("slow", replicas=1, fake_args=("--fake-load-time", "1.5")),
        fake_model("broken", replicas=1, load_timeout=5.0, fake_args=("--fake-never-ready",)),
    ], max_failures=2)
    s = d.wait(lambda s: by_id(s, "slow/0")["state"] == "STARTING", what="slow STARTING")
    s = d.wait(lambda s: by_id(s, "slow/0")["state"] == "READY", what="slow READY")
    s = d.wait(lambda s: by_id(s, "broken/0")["state"] == "FATAL", timeout=40,
               what="broken FATAL")
    broken = by_id(s, "broken/0")
    assert "gave up after 2 failures" in broken["reason"]
    assert "not ready after 5s" in broken["reason"]
    assert broken["log_tail"], "the child's last log lines are in /status"
    # the tail is this child's own log: it starts with the exact command that was spawned
    assert any("spawning:" in line and "--fake-never-ready" in line
               for line in broken["log_tail"])
    # /ready stays 503 while a model has no READY replica
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(d.url + "/ready", timeout=2)
    assert e.value.code == 503
    e.value.close()


def test_sigterm_ignored_child_is_killed_and_no_orphans(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(stop_grace=0.5, fake_args=("--fake-ignore-sigterm",))])
    d.wait_ready()
    d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")
    pids = d.child_pids()
    assert len(pids) == 2
    assert d.stop() == 0
    assert wait_gone(pids) == []


def test_kill_9_daemon_leaves_no_orphans_and_restart_reaps(tmp_path: Path,
                                                          daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(fake_args=("--fake-ignore-sigterm",))])
    d.wait_ready()
    d.wait(lambda s: all(r["state"] == "READY" for r in s["replicas"]), what="both READY")
    pids = d.child_pids()
    assert d.stop(signal.SIGKILL) == -9
    assert wait_gone(pids, timeout=5) == [], "PR_SET_PDEATHSIG took the children down"
    # a leftover that somehow survived (recorded in the state dir) is reaped at start
    survivor = subprocess.Popen(["sleep", "60"], start_new_session=True)
    created = psutil.Process(survivor.pid).create_time()
    (tmp_path / "state" / "children.json").write_text(json.dumps({str(survivor.pid): created}))
    d2 = daemon_factory([fake_model()])
    d2.wait_ready()
    assert survivor.wait(timeout=5) == -signal.SIGKILL
    assert "reaped leftover child pid" in d2.log_text()


def test_client_disconnect_frees_the_slot(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, fake_args=("--fake-token-rate", "5"))])
    d.wait_ready()
    port = d.replicas()[0]["port"]

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(d.url + "/v1/chat/completions",
                                json={**CHAT, "max_tokens": 100, "stream": True})
            await resp.content.readany()
            assert engine_call(port, "/fake/stats")["processing"] == 1
            resp.close()
        for _ in range(50):
            if engine_call(port, "/fake/stats")["processing"] == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the engine kept generating for a gone client")

    asyncio.run(go())
    s = d.status()
    assert s["replicas"][0]["in_flight"] == 0


def test_queue_full_429_and_queue_timeout_503(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, slots=1, max_queue=1, queue_timeout=1.0,
                                   fake_args=("--fake-token-rate", "10"))])
    d.wait_ready()

    async def go() -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            async def one(delay: float) -> tuple[int, dict[str, str], dict[str, Any]]:
                await asyncio.sleep(delay)
                async with s.post(d.url + "/v1/chat/completions",
                                  json={**CHAT, "max_tokens": 25}) as r:
                    return r.status, dict(r.headers), await r.json()
            return list(await asyncio.gather(one(0), one(0.2), one(0.4)))

    results = asyncio.run(go())
    codes = [c for c, _, _ in results]
    assert codes == [200, 503, 429], codes
    assert results[2][1]["Retry-After"] == "1"
    assert results[2][2]["error"]["code"] == "queue_full"
    assert results[1][2]["error"]["code"] == "queue_timeout"


def test_priority_header_jumps_the_queue(daemon_factory: Any) -> None:
    d = daemon_factory([fake_model(replicas=1, slots=1, fake_args=("--fake-token-rate", "20"))])
    d.wait_ready()

    async def go() -> list[str]:
        order: list[str] = []
        async with aiohttp.ClientSession() as s:
            async def one(tag: str, delay: float, prio: str) -> None:
                await asyncio.sleep(delay)
                async with s.post(d.url + "/v1/chat/completions",
                                  json={**CHAT, "max_tokens": 8},
                                  headers={"X-Priority": prio}) as r:
                    assert r.status == 200
                    order.append(tag)
            await asyncio.gather(one("first", 0, "normal"), one("batch", 0.1, "batch"),
                                 one("interactive", 0.2, "interactive"))
        return order

    assert asyncio.run(go()) == ["first", "interactive", "batch"]


def test_auth_keys_and_admin_token(daemon_factory: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("k-file\n")
    d = daemon_factory([fake_model(replicas=1)], api_keys=["k-yaml"],
                       api_keys_file=str(key_file), admin_token="adm")
    d.wait_ready()
    with pytest.raises(openai.AuthenticationError):
        client(d, api_key="wrong").models.list()
    assert client(d, api_key="k-yaml").models.list().data[0].id == "fake"
    assert client(d, api_key="k-file").models.list().data[0].id == "fake"

    async def go() -> list[int]:
        async with aiohttp.ClientSession() as s:
            codes = []
            for path, headers in (("/health", {}), ("/ready", {}), ("/status", {}),
                                  ("/status", {"Authorization": "Bearer adm"})):
                async with s.get(d.url + path, headers=headers) as r:
                    codes.append(r.status)
            for headers in ({}, {"Authorization": "Bearer k-yaml"},
                            {"Authorization": "Bearer adm"}):
                async with s.post(d.url + "/admin/replicas/fake:0/restart",
                                  headers=headers) as r:
                    codes.append(r.status)
            return codes

    assert asyncio.run(go()) == [200, 200, 401, 200, 401, 401, 200]
    d.wait(lambda s: s["replicas"][0]["restarts"] == 1 and s["replicas"][0]["state"] == "READY",
           what="admin restart")
