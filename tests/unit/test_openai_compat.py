"""Aggregating a streamed completion, usage from a stream's tail, error shapes."""

from __future__ import annotations

import json

from supervisor.openai_compat import (
    Aggregator,
    SSEParser,
    Usage,
    error_body,
    error_event,
    usage_from_tail,
    whole_answer,
)


def sse(*chunks: object) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode())
                    + b"\n\n" for c in chunks)


def test_parser_handles_events_split_across_reads() -> None:
    data = sse({"a": 1}, {"b": 2}, b"[DONE]")
    parser = SSEParser()
    out = []
    for i in range(0, len(data), 7):
        out += parser.feed(data[i:i + 7])
    assert out == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


def test_chat_aggregation_with_tool_calls_and_usage() -> None:
    agg = Aggregator("chat")
    stream = sse(
        {"id": "c1", "created": 5, "model": "m", "system_fingerprint": "fp",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "t1", "function": {"name": "get", "arguments": '{"a"'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 4}}},
        b"[DONE]",
    )
    for payload in SSEParser().feed(stream):
        agg.add(payload)
    out = agg.result()
    assert agg.done
    assert out["id"] == "c1" and out["object"] == "chat.completion"
    assert out["system_fingerprint"] == "fp"
    msg = out["choices"][0]["message"]
    assert msg["content"] == "Hello"
    assert msg["tool_calls"] == [{"id": "t1", "type": "function",
                                  "function": {"name": "get", "arguments": '{"a": 1}'}}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                            "prompt_tokens_details": {"cached_tokens": 4}}


def test_text_aggregation_and_timings_fallback() -> None:
    agg = Aggregator("text")
    for payload in SSEParser().feed(sse(
        {"id": "t", "choices": [{"index": 0, "text": "ab"}]},
        {"choices": [{"index": 0, "text": "c", "finish_reason": "stop"}],
         "timings": {"prompt_n": 2, "cache_n": 5, "predicted_n": 2}},
        b"[DONE]",
    )):
        agg.add(payload)
    out = agg.result()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "abc"
    assert out["usage"]["prompt_tokens"] == 7 and out["usage"]["completion_tokens"] == 2
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 5


def test_usage_from_tail_reads_only_final_events() -> None:
    tail = sse({"choices": [{"delta": {"content": "x"}}]},
               {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}},
               b"[DONE]")
    assert usage_from_tail(tail) == Usage(3, 9, 0)
    assert usage_from_tail(b"data: {broken\n\n") is None


def test_error_shapes() -> None:
    body = error_body(404, "no such model", code="model_not_found")
    assert body == {"error": {"message": "no such model", "type": "not_found_error",
                              "param": None, "code": "model_not_found"}}
    event = error_event(502, "replica died")
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "replica died"


def test_parser_accepts_crlf_events_split_between_cr_and_lf() -> None:
    data = b'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    cut = data.index(b"\r\n\r\n") + 1  # between a CR and its LF
    parser = SSEParser()
    assert parser.feed(data[:cut]) == []
    assert parser.feed(data[cut:]) == [b'{"a": 1}', b"[DONE]"]
    assert usage_from_tail(b'data: {"usage": {"prompt_tokens": 2}}\r\n\r\n') == Usage(2, 0, 0)


def test_whole_answer_reads_usage_and_the_time_after_the_first_token() -> None:
    body = (b'{"choices":[{"message":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16},'
            b'"timings":{"cache_n":8,"prompt_n":4,"predicted_n":4,"predicted_ms":250.0}}')
    usage, after_first = whole_answer(body)
    assert usage == Usage(prompt=12, completion=4, cached=8)
    assert after_first == 0.25


def test_whole_answer_without_timings_or_json() -> None:
    assert whole_answer(b'{"usage":{"prompt_tokens":3,"completion_tokens":1}}') == (
        Usage(prompt=3, completion=1, cached=0), None)
    assert whole_answer(b"not json") == (None, None)
    assert whole_answer(b"[1]") == (None, None)
    assert whole_answer(b'{"timings":{"predicted_ms":"x"}}') == (Usage(), None)
