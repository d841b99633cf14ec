"""The same smoke test on the second engine: llama-cpp-python's server."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import need, serve_demo
from tests.integration.daemon_proc import DaemonProc

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    need("llama_cpp", "the llama-cpp-python engine (llama-cpp-python[server])")
    yield from serve_demo(tmp_path_factory.mktemp("e2e-lcp"), engine="llama-cpp-python", slots=1)


def test_smoke(daemon: DaemonProc) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    try:
        _smoke(daemon, client)
    finally:
        client.close()


def _smoke(daemon: DaemonProc, client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    assert out.choices[0].message.content is not None
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=12, stream=True) if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    text = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4)
    assert text.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                "content": "x"}])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: client.completions.create(model=MODEL, prompt=f"{i}",
                                                          max_tokens=2), range(4)))
    replicas = daemon.status()["replicas"]
    assert all(r["requests"] >= 1 for r in replicas), replicas
