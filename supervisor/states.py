"""Replica states and the transitions allowed between them."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a replica is in its life."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


# Written down once; `check_transition` asserts against it before every move.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    # STARTING -> STOPPING: a boot failure or a stop asked for while loading.
    State.STARTING: frozenset({State.READY, State.STOPPING}),
    # READY -> UNHEALTHY on one failed probe; -> STOPPING when hung, gone or asked to stop.
    State.READY: frozenset({State.UNHEALTHY, State.STOPPING}),
    State.UNHEALTHY: frozenset({State.READY, State.STOPPING}),
    # STOPPING ends in STOPPED (asked), BACKOFF (failure, will retry) or FATAL (gave up).
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FATAL}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED}),
    # FATAL is left only by an explicit restart or a reload.
    State.FATAL: frozenset({State.STARTING, State.STOPPED}),
}

SERVING = frozenset({State.READY})


class TransitionError(RuntimeError):
    """A move the state table does not allow."""


def check_transition(src: State, dst: State) -> None:
    """Raise TransitionError unless src -> dst is in TRANSITIONS."""
    if dst not in TRANSITIONS[src]:
        raise TransitionError(f"illegal transition {src.value} -> {dst.value}")
