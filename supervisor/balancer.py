"""The balancer's choice of replica: a pure function of a snapshot."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PRIORITIES: Mapping[str, int] = {"interactive": 0, "high": 0, "normal": 1, "batch": 2, "low": 2}
BLOCK_CHARS = 512


@dataclass(frozen=True)
class Candidate:
    """A replica as the balancer sees it at one instant."""

    id: str
    in_flight: int
    slots: int

    @property
    def load(self) -> float:
        return self.in_flight / self.slots if self.slots > 0 else float("inf")


def choose(
    candidates: Sequence[Candidate],
    affine: str | None = None,
    margin: float = 0.5,
    exclude: frozenset[str] = frozenset(),
    turn: int = 0,
) -> str | None:
    """The replica to send a request to, or None when every one is at its slots.

    Least load (in-flight / slots) wins; the replica that last served this
    prompt's prefix wins instead unless its load is more than `margin` above the
    least. Ties rotate by `turn` so idle replicas share the traffic.
    """
    open_ = [c for c in candidates if c.id not in exclude and c.in_flight < c.slots]
    if not open_:
        return None
    least = min(c.load for c in open_)
    if affine is not None:
        for c in open_:
            if c.id == affine and c.load - least <= margin:
                return c.id
    tied = [c for c in open_ if c.load == least]
    return tied[turn % len(tied)].id


def defer_for_affine(candidates: Sequence[Candidate], affine: str | None,
                     exclude: frozenset[str] = frozenset()) -> bool:
    """Whether a queued request should let other waiters take a free slot first.

    True while the replica that holds its prefix is a candidate (READY) but at its slots:
    that replica's next free slot is coming, and a slot elsewhere means re-reading the whole
    prefix there. The request still takes any slot that no other waiter wants.
    """
    if affine is None or affine in exclude:
        return False
    return any(c.id == affine and c.in_flight >= c.slots for c in candidates)


def _digest(prev: str, block: str) -> str:
    return hashlib.blake2b((prev + "\x00" + block).encode(), digest_size=12).hexdigest()


def prefix_keys(body: Mapping[str, object]) -> list[str]:
    """Cumulative hashes of a request's reusable prefix, shortest first.

    For chat: the system prompt and every earlier turn, one block per message
    (the last message is new, so it is left out). For completions: the prompt in
    fixed-size blocks, the last partial block left out.
    """
    keys: list[str] = []
    prev = str(body.get("model", ""))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages[:-1]:
            block = json.dumps(message, sort_keys=True, separators=(",", ":"))
            prev = _digest(prev, block)
            keys.append(prev)
        return keys
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        for start in range(0, len(prompt) - BLOCK_CHARS + 1, BLOCK_CHARS):
            prev = _digest(prev, prompt[start:start + BLOCK_CHARS])
            keys.append(prev)
    return keys


def priority_of(value: str | None) -> int:
    """Queue rank of a priority header value: lower goes first; unknown is normal."""
    if value is None:
        return PRIORITIES["normal"]
    return PRIORITIES.get(value.strip().lower(), PRIORITIES["normal"])
