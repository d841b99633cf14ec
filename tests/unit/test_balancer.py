"""The balancer's pure choice, on tables."""

from __future__ import annotations

import pytest

from supervisor.balancer import Candidate, choose, defer_for_affine, prefix_keys, priority_of


def cands(*loads: tuple[int, int]) -> list[Candidate]:
    return [Candidate(f"r{i}", in_flight, slots) for i, (in_flight, slots) in enumerate(loads)]


@pytest.mark.parametrize(
    ("loads", "affine", "margin", "exclude", "expected"),
    [
        # least load wins
        (((1, 4), (0, 4)), None, 0.5, (), "r1"),
        # load is in-flight / slots, not in-flight alone
        (((2, 8), (1, 2)), None, 0.5, (), "r0"),
        # a replica at its slots is never chosen
        (((2, 2), (3, 4)), None, 0.5, (), "r1"),
        # every replica full: None (the caller queues)
        (((2, 2), (4, 4)), None, 0.5, (), None),
        # affinity wins within the margin
        (((1, 4), (0, 4)), "r0", 0.5, (), "r0"),
        # affinity loses beyond the margin
        (((3, 4), (0, 4)), "r0", 0.5, (), "r1"),
        # affinity to a full replica falls back to least loaded
        (((4, 4), (1, 4)), "r0", 1.0, (), "r1"),
        # excluded replica (failed over from) is skipped even if least loaded
        (((0, 4), (3, 4)), None, 0.5, ("r0",), "r1"),
        # affinity to an unknown replica is ignored
        (((1, 4), (0, 4)), "gone", 0.5, (), "r1"),
        # zero margin: affinity only on exact ties
        (((1, 4), (1, 4)), "r1", 0.0, (), "r1"),
    ],
)
def test_choose(loads: tuple[tuple[int, int], ...], affine: str | None, margin: float,
                exclude: tuple[str, ...], expected: str | None) -> None:
    assert choose(cands(*loads), affine, margin, frozenset(exclude)) == expected


def test_ties_rotate_by_turn() -> None:
    table = cands((0, 2), (0, 2), (0, 2))
    assert [choose(table, turn=t) for t in range(4)] == ["r0", "r1", "r2", "r0"]


def test_prefix_keys_chat_grow_with_turns_and_skip_the_last_message() -> None:
    turn1 = {"model": "m", "messages": [{"role": "system", "content": "S"},
                                        {"role": "user", "content": "a"}]}
    turn2 = {"model": "m", "messages": [{"role": "system", "content": "S"},
                                        {"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}]}
    k1, k2 = prefix_keys(turn1), prefix_keys(turn2)
    assert len(k1) == 1 and len(k2) == 3
    assert k2[0] == k1[0]  # the shared system prompt hashes the same
    other = {"model": "m", "messages": [{"role": "system", "content": "T"},
                                        {"role": "user", "content": "a"}]}
    assert prefix_keys(other)[0] != k1[0]
    assert prefix_keys({"model": "x", **{"messages": turn1["messages"]}})[0] != k1[0]


def test_prefix_keys_completion_blocks() -> None:
    assert prefix_keys({"model": "m", "prompt": "x" * 100}) == []
    keys = prefix_keys({"model": "m", "prompt": "x" * 1100})
    assert len(keys) == 2
    assert prefix_keys({"model": "m", "prompt": "x" * 1024 + "tail"})[:2] == keys


@pytest.mark.parametrize(("value", "rank"), [
    (None, 1), ("interactive", 0), ("BATCH", 2), ("normal", 1), ("nonsense", 1), (" high ", 0),
])
def test_priority_of(value: str | None, rank: int) -> None:
    assert priority_of(value) == rank


@pytest.mark.parametrize(("loads", "affine", "exclude", "expected"), [
    # the prefix holder is full: wait for it rather than re-read the prefix elsewhere
    (((2, 2), (0, 2)), "r0", (), True),
    # the prefix holder has a free slot: no need to wait
    (((1, 2), (0, 2)), "r0", (), False),
    # no affinity, or affinity to a replica that is gone or was failed over from
    (((2, 2), (0, 2)), None, (), False),
    (((2, 2), (0, 2)), "gone", (), False),
    (((2, 2), (0, 2)), "r0", ("r0",), False),
])
def test_defer_for_affine(loads: tuple[tuple[int, int], ...], affine: str | None,
                          exclude: tuple[str, ...], expected: bool) -> None:
    assert defer_for_affine(cands(*loads), affine, frozenset(exclude)) is expected
