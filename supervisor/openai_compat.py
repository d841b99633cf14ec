"""OpenAI wire shapes: error bodies, and turning an upstream SSE stream into one response."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

loads: Callable[[bytes], Any]
dumps: Callable[[Any], bytes]
try:  # the `fast` extra: several times faster on request bodies and stream chunks
    from orjson import dumps, loads
except ImportError:  # pragma: no cover - exercised where orjson is absent
    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_event(status: int, message: str) -> bytes:
    """An SSE event that ends a broken stream; OpenAI clients raise on it."""
    return b"data: " + json.dumps(error_body(status, message, code="upstream_failed")).encode() \
        + b"\n\n"


@dataclass
class Usage:
    """Tokens of one request, as the engine reported them."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any]) -> Usage | None:
        usage = chunk.get("usage")
        timings = chunk.get("timings")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or 0)
            if not cached and isinstance(timings, dict):
                cached = int(timings.get("cache_n") or 0)
            return cls(int(usage.get("prompt_tokens") or 0),
                       int(usage.get("completion_tokens") or 0), cached)
        if isinstance(timings, dict):
            cache_n = int(timings.get("cache_n") or 0)
            return cls(int(timings.get("prompt_n") or 0) + cache_n,
                       int(timings.get("predicted_n") or 0), cache_n)
        return None


def usage_from_tail(tail: bytes) -> Usage | None:
    """Usage from the last events of a relayed stream (only those are parsed)."""
    for event in reversed(tail.replace(b"\r\n", b"\n").split(b"\n\n")):
        line = event.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload.startswith(b"{"):
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        usage = Usage.from_chunk(chunk)
        if usage is not None:
            return usage
    return None


def whole_answer(body: bytes) -> tuple[Usage | None, float | None]:
    """Usage of a whole (non-streamed) completion, and the seconds the engine spent after
    its first token (llama-server's `timings.predicted_ms`); None where it says nothing."""
    try:
        obj = loads(body)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    timings = obj.get("timings")
    predicted = timings.get("predicted_ms") if isinstance(timings, dict) else None
    after_first = predicted / 1000 if isinstance(predicted, int | float) else None
    return Usage.from_chunk(obj), after_first


class SSEParser:
    """Splits an SSE byte stream into `data:` payloads."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        # sse-starlette (llama-cpp-python) ends lines with CRLF; a CR split from its LF
        # across reads is joined up here because the whole buffer is normalised.
        self._buf = (self._buf + data).replace(b"\r\n", b"\n")
        out = []
        while True:
            idx = self._buf.find(b"\n\n")
            if idx < 0:
                break
            event, self._buf = self._buf[:idx], self._buf[idx + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip())
        return out


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None


class Aggregator:
    """Builds a non-streaming chat or text completion from streamed chunks."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "chat" | "text"
        self.choices: dict[int, _Choice] = {}
        self.first: dict[str, Any] | None = None
        self.usage: Usage | None = None
        self.timings: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False

    def add(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        chunk = loads(payload)
        if "error" in chunk:
            self.error = chunk
            return
        if self.first is None:
            self.first = chunk
        if "usage" in chunk or "timings" in chunk:
            usage = Usage.from_chunk(chunk)
            if usage is not None:
                self.usage = usage
            if isinstance(chunk.get("timings"), dict):
                self.timings = chunk["timings"]
        for c in chunk.get("choices") or []:
            choice = self.choices.setdefault(int(c.get("index", 0)), _Choice())
            if c.get("finish_reason"):
                choice.finish_reason = c["finish_reason"]
            if self.kind == "text":
                choice.content.append(c.get("text") or "")
                continue
            delta = c.get("delta") or {}
            if delta.get("role"):
                choice.role = delta["role"]
            if delta.get("content"):
                choice.content.append(delta["content"])
            if delta.get("reasoning_content"):
                choice.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                self._merge_tool_call(choice, call)

    @staticmethod
    def _merge_tool_call(choice: _Choice, call: dict[str, Any]) -> None:
        slot = choice.tool_calls.setdefault(
            int(call.get("index", 0)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += fn["arguments"]

    def result(self) -> dict[str, Any]:
        first = self.first or {}
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            if self.kind == "text":
                choices.append({"index": index, "text": "".join(c.content),
                                "logprobs": None, "finish_reason": c.finish_reason})
                continue
            message: dict[str, Any] = {"role": c.role, "content": "".join(c.content)}
            if c.reasoning:
                message["reasoning_content"] = "".join(c.reasoning)
            if c.tool_calls:
                message["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
            choices.append({"index": index, "message": message,
                            "finish_reason": c.finish_reason})
        usage = self.usage or Usage()
        out: dict[str, Any] = {
            "id": first.get("id", ""),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": first.get("created", 0),
            "model": first.get("model", ""),
            "choices": choices,
            "usage": {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
                      "total_tokens": usage.prompt + usage.completion,
                      "prompt_tokens_details": {"cached_tokens": usage.cached}},
        }
        if first.get("system_fingerprint"):
            out["system_fingerprint"] = first["system_fingerprint"]
        if self.timings is not None:
            out["timings"] = self.timings
        return out
