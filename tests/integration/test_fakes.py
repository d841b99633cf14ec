"""The fake engines themselves, as real child processes over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import time
from typing import Any

import aiohttp
import ollama
import openai

from tests.fakes.spawn import start_fake, start_llama, start_ollama

SHORT = aiohttp.ClientTimeout(total=5)
CHAT = "/v1/chat/completions"


def chat_body(text: str = "hello there, how are you today?", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


async def assert_silent(s: aiohttp.ClientSession, url: str, seconds: float) -> None:
    """A GET of `url` gets no answer within `seconds`."""
    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=seconds)) as r:
            raise AssertionError(f"{url} answered {r.status}")
    except TimeoutError:
        pass


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """(arrival time, payload) for every `data:` line of an SSE response."""
    events: list[tuple[float, str]] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append((time.monotonic(), line[len("data: "):]))
    return events


# ---- fake_llama_server -----------------------------------------------------------------------


async def test_llama_health_is_503_while_loading_then_200() -> None:
    with start_llama(["--fake-load-time", "1.0"], ready_path=None) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.get(fake.url + "/health") as r:
                assert r.status == 503
                assert await r.json() == {"error": {"code": 503, "message": "Loading model",
                                                    "type": "unavailable_error"}}
            async with s.post(fake.url + CHAT, json=chat_body()) as r:
                assert r.status == 503
            deadline = time.monotonic() + 3
            while True:
                async with s.get(fake.url + "/health") as r:
                    if r.status == 200:
                        assert await r.json() == {"status": "ok"}
                        break
                assert time.monotonic() < deadline, "never became ready"
                await asyncio.sleep(0.05)
        log = fake.log_text()
    assert f"main: server is listening on http://127.0.0.1:{fake.port}" in log
    assert "srv  log_server_r: request: GET /health 127.0.0.1 503" in log


async def test_llama_stream_is_paced_by_token_rate_and_ends_with_usage() -> None:
    with start_llama(["--fake-token-rate", "20", "--fake-tokens", "8"]) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            body = chat_body(stream=True, stream_options={"include_usage": True})
            async with s.post(fake.url + CHAT, json=body) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                events = await read_sse(r)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [(t, c) for (t, _), c in zip(events, chunks, strict=False)
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"]["content"] for _, c in content) == \
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    # 8 tokens at 20/s: the first arrives well before the last is produced
    assert content[-1][0] - content[0][0] >= 0.25
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["timings"]["predicted_n"] == 8
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 8
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    assert str(fake.port) in usage["system_fingerprint"]


async def test_llama_completion_usage_timings_and_prefix_cache() -> None:
    env = {"FAKE_TOKENS": "3", "FAKE_TOKEN_RATE": "0"}
    with start_llama(["-m", "/models/gemma.gguf", "-np", "1"], env=env) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            text = "a long shared system prompt " * 8
            async with s.post(fake.url + CHAT, json=chat_body(text)) as r:
                first = await r.json()
            async with s.post(fake.url + CHAT, json=chat_body(text + " and more")) as r:
                second = await r.json()
            async with s.post(fake.url + CHAT, json=chat_body("x" * 40, max_tokens=2)) as r:
                limited = await r.json()
            async with s.post(fake.url + "/v1/completions",
                              json={"prompt": "once upon", "max_tokens": 4}) as r:
                text_completion = await r.json()
            async with s.post(fake.url + "/completion",
                              json={"prompt": "once upon", "n_predict": 2}) as r:
                native = await r.json()
            async with s.get(fake.url + "/v1/models") as r:
                models = await r.json()
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["message"]["content"] == "tok0 tok1 tok2"  # FAKE_TOKENS from env
    assert first["usage"]["completion_tokens"] == 3
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["timings"]["cache_n"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 40
    assert second["timings"]["cache_n"] == second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 2
    assert text_completion["choices"][0]["text"] == "tok0 tok1 tok2 tok3"
    assert native["content"] == "tok0 tok1" and native["stop"] is True
    assert models["data"][0]["id"] == "gemma.gguf"


async def test_llama_honours_parallel_and_defers_the_rest() -> None:
    args = ["--parallel", "2", "--fake-token-rate", "50", "--fake-tokens", "5", "--metrics"]
    with start_llama(args) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:

            async def one() -> int:
                async with s.post(fake.url + CHAT, json=chat_body()) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(5)))
            async with s.get(fake.url + "/slots") as r:
                slots = await r.json()
            async with s.get(fake.url + "/metrics") as r:
                metrics = await r.text()
        stats = fake.stats()
    assert statuses == [200] * 5
    assert stats["max_concurrent"] == 2
    assert stats["max_in_flight"] == 5
    assert stats["deferred_total"] >= 3
    assert stats["requests"][CHAT] == 5
    assert len(slots) == 2 and {s["id"] for s in slots} == {0, 1}
    assert "llamacpp:tokens_predicted_total 25" in metrics
    assert "llamacpp:requests_deferred 0" in metrics


async def test_llama_parses_its_command_line_and_ignores_unknown_flags() -> None:
    args = ["-m", "/m/x.gguf", "--alias", "gem", "-c", "8192", "-np", "4", "-t", "3",
            "-ngl", "99", "--split-mode", "layer", "--tensor-split", "0.6,0.4", "-ctk", "q8_0",
            "-cb", "--temp", "0.7", "--jinja", "--no-webui", "-fa", "on"]
    with start_llama(args, env={"CUDA_VISIBLE_DEVICES": "GPU-abc"}) as fake:
        stats = fake.stats()
        status, models = fake.request("GET", "/v1/models")
        bad_status, bad = fake.request("POST", CHAT, None)
        status_400, body_400 = fake.request("POST", "/v1/embeddings", {"input": []})
    cfg = stats["config"]
    assert (cfg["ctx_size"], cfg["parallel"], cfg["threads"]) == (8192, 4, 3)
    assert (cfg["split_mode"], cfg["tensor_split"], cfg["n_gpu_layers"]) == ("layer", "0.6,0.4",
                                                                             "99")
    assert stats["slots"] == 4 and stats["n_ctx_slot"] == 2048
    assert stats["ignored_args"] == ["-ctk", "q8_0", "-cb", "--temp", "0.7", "-fa", "on"]
    assert stats["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-abc"
    assert status == 200 and models["data"][0]["id"] == "gem"
    assert bad_status == 400 and bad["error"]["type"] == "invalid_request_error"
    assert status_400 == 400 and body_400["error"]["code"] == 400


async def test_llama_malformed_json_is_400_and_embeddings_are_deterministic() -> None:
    with start_llama() as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.post(fake.url + CHAT, data=b"{not json") as r:
                assert r.status == 400
                err = await r.json()
            vectors = []
            for _ in range(2):
                async with s.post(fake.url + "/v1/embeddings",
                                  json={"model": "m", "input": ["a", "b"]}) as r:
                    vectors.append(await r.json())
    assert err["error"]["code"] == 400 and err["error"]["message"]
    assert [len(d["embedding"]) for d in vectors[0]["data"]] == [8, 8]
    assert vectors[0]["data"] == vectors[1]["data"]
    assert vectors[0]["data"][0]["embedding"] != vectors[0]["data"][1]["embedding"]


async def test_llama_hang_after_n_keeps_health_green() -> None:
    with start_llama(["--fake-hang-after", "1", "--fake-token-rate", "0"]) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.post(fake.url + CHAT, json=chat_body()) as r:
                assert r.status == 200
            started = time.monotonic()
            try:
                async with s.post(fake.url + CHAT, json=chat_body(),
                                  timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    raise AssertionError(f"answered {r.status}")
            except TimeoutError:
                pass
            assert time.monotonic() - started >= 0.45
            async with s.get(fake.url + "/health") as r:
                assert r.status == 200
        assert fake.stats()["hung"] == 1


async def test_llama_slots_goes_silent_while_a_generation_is_wedged() -> None:
    """/slots is served by llama-server's generation loop; /health is not."""
    with start_llama(["--fake-hang-after", "1", "--fake-token-rate", "0"]) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.get(fake.url + "/slots") as r:
                assert r.status == 200
            async with s.post(fake.url + CHAT, json=chat_body()) as r:
                assert r.status == 200
            wedged = asyncio.ensure_future(s.post(fake.url + CHAT, json=chat_body()))
            deadline = time.monotonic() + 3
            while fake.stats()["hung"] < 1:
                assert time.monotonic() < deadline, "the second completion never wedged"
                await asyncio.sleep(0.02)
            async with s.get(fake.url + "/health") as r:
                assert r.status == 200
            await assert_silent(s, fake.url + "/slots", 0.5)
            wedged.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wedged


async def test_llama_crash_mid_stream_cuts_the_stream_and_exits_1() -> None:
    with start_llama(["--fake-crash-mid-stream", "1", "--fake-token-rate", "50",
                      "--fake-tokens", "10"]) as fake:
        received: list[str] = []
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            try:
                async with s.post(fake.url + CHAT, json=chat_body(stream=True)) as r:
                    assert r.status == 200
                    async for raw in r.content:
                        if raw.startswith(b"data: "):
                            received.append(raw.decode().strip())
            except aiohttp.ClientError:
                pass  # the connection died under the stream, as it should
        assert fake.wait(timeout=3) == 1
    assert 1 <= len(received) < 10
    assert "data: [DONE]" not in received


async def test_llama_stall_mid_stream_keeps_the_connection_open_and_silent() -> None:
    with start_llama(["--fake-stall-mid-stream", "1", "--fake-token-rate", "0"]) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.post(fake.url + CHAT, json=chat_body(stream=True)) as r:
                first = await r.content.readuntil(b"\n\n")  # the role chunk arrives
                got = b""
                try:
                    async with asyncio.timeout(0.5):
                        while True:
                            got += await r.content.readany()
                except TimeoutError:
                    pass
        assert fake.stats()["hung"] == 1
    assert b'"role":"assistant"' in first
    assert got.count(b"data: ") == 2 and b"[DONE]" not in got  # two tokens, then silence


async def test_llama_sigterm_exits_0_promptly() -> None:
    with start_llama() as fake:
        fake.send_signal(signal.SIGTERM)
        assert fake.wait(timeout=2) == 0


async def test_llama_ignore_sigterm_survives_until_sigkill() -> None:
    with start_llama(["--fake-ignore-sigterm"]) as fake:
        fake.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert fake.alive
        assert fake.request("GET", "/health")[0] == 200
        fake.send_signal(signal.SIGKILL)
        assert fake.wait(timeout=2) == -signal.SIGKILL


async def test_llama_crash_after_seconds_exits_1() -> None:
    with start_llama(env={"FAKE_CRASH_AFTER_S": "0.3"}) as fake:
        assert fake.wait(timeout=3) == 1


async def test_llama_control_flips_behaviour_at_runtime() -> None:
    with start_llama(["--fake-token-rate", "0"]) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            fake.control(fail_status=500)
            async with s.post(fake.url + CHAT, json=chat_body()) as r:
                assert r.status == 500
                assert (await r.json())["error"]["code"] == 500
            fake.control(fail_status=None, ready=False)
            async with s.get(fake.url + "/health") as r:
                assert r.status == 503
            fake.control(ready=True, hang_health=True)
            await assert_silent(s, fake.url + "/health", 0.3)
            fake.control(hang_health=False)
            async with s.get(fake.url + "/health") as r:
                assert r.status == 200
            fake.control(crash=True)
        assert fake.wait(timeout=2) == 1


async def test_llama_with_the_openai_client() -> None:
    with start_llama(["--alias", "gemma", "--fake-token-rate", "0", "--fake-tokens", "4"]) as fake:
        async with openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="none") as client:
            reply = await client.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": "hi"}])
            stream = await client.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            pieces: list[str] = []
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            listed = await client.models.list()
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert "".join(pieces) == "tok0 tok1 tok2 tok3"
    assert usage is not None and usage.completion_tokens == 4
    assert [m.id for m in listed.data] == ["gemma"]


# ---- fake_ollama -----------------------------------------------------------------------------


async def test_ollama_create_preload_ps_and_evict_on_cue() -> None:
    with start_ollama() as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            async with s.get(fake.url + "/") as r:
                assert await r.text() == "Ollama is running"
            async with s.head(fake.url + "/") as r:
                assert r.status == 200
            async with s.get(fake.url + "/api/version") as r:
                assert "version" in await r.json()
            create = {"model": "gemma", "from": "/models/gemma.gguf",
                      "parameters": {"num_ctx": 2048}, "system": "be brief"}
            async with s.post(fake.url + "/api/create", json=create) as r:
                lines = [json.loads(line) for line in (await r.text()).splitlines()]
            assert lines[-1] == {"status": "success"}
            async with s.get(fake.url + "/api/tags") as r:
                assert [m["name"] for m in (await r.json())["models"]] == ["gemma:latest"]
            async with s.post(fake.url + "/api/generate",
                              json={"model": "gemma", "keep_alive": -1}) as r:
                loaded = await r.json()
            assert (loaded["done"], loaded["done_reason"], loaded["response"]) == (True, "load",
                                                                                   "")
            async with s.get(fake.url + "/api/ps") as r:
                running = (await r.json())["models"]
            assert [m["name"] for m in running] == ["gemma:latest"]
            assert running[0]["context_length"] == 2048
            assert dt.datetime.fromisoformat(running[0]["expires_at"]).year > 2200
            assert fake.control(evict="gemma")["evicted"] == ["gemma:latest"]
            async with s.get(fake.url + "/api/ps") as r:
                assert (await r.json())["models"] == []
            async with s.post(fake.url + "/api/show", json={"model": "gemma"}) as r:
                shown = await r.json()
        assert fake.stats()["evictions"] == 1
    assert "PARAMETER num_ctx 2048" in shown["modelfile"] and shown["system"] == "be brief"


async def test_ollama_num_ctx_change_reloads_and_is_counted() -> None:
    env = {"FAKE_MODELS": "gemma", "FAKE_TOKEN_RATE": "0", "FAKE_TOKENS": "2"}
    with start_ollama(env) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            chat = {"model": "gemma", "stream": False,
                    "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(fake.url + "/api/chat", json=chat) as r:
                first = await r.json()
            async with s.post(fake.url + "/api/chat", json=chat) as r:
                await r.read()
            async with s.post(fake.url + "/api/chat",
                              json={**chat, "options": {"num_ctx": 8192}}) as r:
                await r.read()
            async with s.get(fake.url + "/api/ps") as r:
                running = (await r.json())["models"]
        stats = fake.stats()
    assert first["message"] == {"role": "assistant", "content": "tok0 tok1"}
    assert first["done"] is True and first["eval_count"] == 2
    assert (stats["loads"], stats["reloads"]) == (2, 1)
    assert running[0]["context_length"] == 8192


async def test_ollama_evicts_least_recently_used_past_max_loaded() -> None:
    env = {"FAKE_MODELS": "a,b,c", "OLLAMA_MAX_LOADED_MODELS": "2", "FAKE_LOAD_TIME": "0.1"}
    with start_ollama(env) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            loads = []
            for name in ("a", "b", "a", "c"):
                async with s.post(fake.url + "/api/generate",
                                  json={"model": name, "keep_alive": -1}) as r:
                    assert (await r.json())["done_reason"] == "load"
                loads.append(fake.stats()["loads"])
            assert loads == [1, 2, 2, 3]  # the second "a" found it resident
            async with s.get(fake.url + "/api/ps") as r:
                names = sorted(m["name"] for m in (await r.json())["models"])
            async with s.post(fake.url + "/api/generate",
                              json={"model": "a", "keep_alive": 0}) as r:
                assert (await r.json())["done_reason"] == "unload"
            async with s.post(fake.url + "/api/generate", json={"model": "zzz"}) as r:
                assert r.status == 404
                assert "not found" in (await r.json())["error"]
        stats = fake.stats()
    assert names == ["a:latest", "c:latest"]  # b was the least recently used
    assert (stats["evictions"], stats["unloads"]) == (1, 1)
    assert list(stats["loaded"]) == ["c:latest"]


async def test_ollama_honours_num_parallel() -> None:
    env = {"FAKE_MODELS": "gemma", "OLLAMA_NUM_PARALLEL": "2", "FAKE_TOKEN_RATE": "50",
           "FAKE_TOKENS": "5"}
    with start_ollama(env) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:

            async def one() -> int:
                body = {"model": "gemma", "prompt": "hi", "stream": False}
                async with s.post(fake.url + "/api/generate", json=body) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(4)))
        stats = fake.stats()
    assert statuses == [200] * 4
    assert (stats["max_concurrent"], stats["max_in_flight"], stats["loads"]) == (2, 4, 1)


async def test_ollama_openai_compatible_stream() -> None:
    env = {"FAKE_MODELS": "gemma", "FAKE_TOKEN_RATE": "40", "FAKE_TOKENS": "6"}
    with start_ollama(env) as fake:
        async with aiohttp.ClientSession(timeout=SHORT) as s:
            body = {"model": "gemma", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(fake.url + CHAT, json=body) as r:
                events = await read_sse(r)
            async with s.get(fake.url + "/v1/models") as r:
                models = await r.json()
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == \
        "tok0 tok1 tok2 tok3 tok4 tok5"
    assert events[-3][0] - events[0][0] >= 0.08  # paced, not buffered
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert [m["id"] for m in models["data"]] == ["gemma:latest"]


async def test_ollama_with_the_official_client() -> None:
    env = {"FAKE_TOKEN_RATE": "0", "FAKE_TOKENS": "3", "FAKE_LOAD_TIME": "0.2"}
    with start_ollama(env) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            await client.create(model="gemma", from_="/models/gemma.gguf",
                                parameters={"num_ctx": 1024}, stream=False)
            started = time.monotonic()
            await client.generate(model="gemma", keep_alive=-1)
            assert time.monotonic() - started >= 0.2  # loading takes the load time
            pieces = [part.message.content async for part in await client.chat(
                model="gemma", messages=[{"role": "user", "content": "hi"}], stream=True)]
            running = await client.ps()
            listed = await client.list()
            embedded = await client.embed(model="gemma", input=["x", "y"])
    assert "".join(p or "" for p in pieces) == "tok0 tok1 tok2"
    assert [m.model for m in running.models] == ["gemma:latest"]
    assert running.models[0].context_length == 1024
    assert [m.model for m in listed.models] == ["gemma:latest"]
    assert len(embedded.embeddings) == 2


async def test_ollama_persists_models_in_ollama_models(tmp_path: Any) -> None:
    env = {"OLLAMA_MODELS": str(tmp_path)}
    with start_ollama(env) as fake:
        status, _ = fake.request("POST", "/api/create",
                                 {"model": "kept", "from": "base", "stream": False})
        assert status == 200
    with start_fake("fake_ollama", env=env, ready_path="/") as again:
        status, tags = again.request("GET", "/api/tags")
    assert [m["name"] for m in tags["models"]] == ["kept:latest"]
