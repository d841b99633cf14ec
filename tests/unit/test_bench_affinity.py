"""The affinity bench's workload and bookkeeping (the bench itself runs in test_balance_smoke)."""

from __future__ import annotations

import argparse

import pytest

from tests.bench.affinity import Played, Turn, make_workload, pooled, summarize, token_range
from tests.bench.balance import Result


def test_token_range_reads_one_number_or_a_range() -> None:
    assert token_range("16") == (16, 16)
    assert token_range("4-28") == (4, 28)
    for bad in ("", "x", "0-4", "9-3", "4-"):
        with pytest.raises(argparse.ArgumentTypeError):
            token_range(bad)


def test_workload_is_seeded_and_reply_lengths_vary_within_the_range() -> None:
    a = make_workload(7, 8, 6, (300, 600), (4, 28))
    assert a == make_workload(7, 8, 6, (300, 600), (4, 28))
    assert a != make_workload(8, 8, 6, (300, 600), (4, 28))
    replies = [n for conv in a for n in conv.replies]
    assert len(replies) == 48 and all(4 <= n <= 28 for n in replies)
    # a fixed length is what let chats fall into lockstep: the default must not be one
    assert len(set(replies)) > 10
    assert len({conv.system for conv in a}) == 8  # every chat has its own prefix
    assert all(len(conv.users) == len(conv.thinks) == 6 for conv in a)


def _turn(conversation: int, turn: int, prompt: int, cached: int, ttft: float) -> Turn:
    res = Result("on", 0, turn, 16, 0.0, ok=True, status=200, ttft=ttft,
                 prompt_tokens=prompt, cached_tokens=cached)
    return Turn(conversation, turn, res)


def test_a_follow_up_hits_only_when_the_previous_prompt_was_reused() -> None:
    turns = [
        _turn(0, 0, 400, 0, 3.0),
        _turn(0, 1, 460, 400, 0.5),   # reused all of turn 0's 400: hit
        _turn(0, 2, 520, 100, 2.0),   # went elsewhere: miss
        _turn(1, 0, 300, 0, 2.5),
        _turn(1, 1, 360, 270, 0.6),   # 270 >= 0.9 * 300: hit
    ]
    s = summarize(turns)
    assert s["prefix_hit_share"] == pytest.approx(2 / 3)
    assert s["all"]["requests"] == 5 and s["follow_up"]["requests"] == 3
    assert s["follow_up"]["cached_mean"] == pytest.approx((400 + 100 + 270) / 3)


def test_pooled_rounds_keep_their_conversations_apart() -> None:
    # Round 1 replays conversation 0 on fresh engines: its turn 0 must not count as the
    # "previous turn" of round 0's turns, nor the other way round.
    r0 = Played([_turn(0, 0, 400, 0, 3.0), _turn(0, 1, 460, 400, 0.5)], [], 10.0, [1],
                {"prompt": 860, "completion": 32, "cached": 400})
    r1 = Played([_turn(0, 0, 400, 0, 3.2), _turn(0, 1, 460, 0, 2.9)], [], 12.0, [2],
                {"prompt": 860, "completion": 32, "cached": 0})
    s = pooled([r0, r1])
    assert s["prefix_hit_share"] == pytest.approx(0.5)
    assert s["all"]["requests"] == 4
    assert [r["prefix_hit_share"] for r in s["rounds"]] == [1.0, 0.0]
    assert s["daemon_tokens"] == {"prompt": 1720, "completion": 64, "cached": 400}
    assert s["wall_s"] == pytest.approx(22.0) and s["pids"] == [1, 2]
