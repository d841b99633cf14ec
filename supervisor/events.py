"""A bounded log of what happened (hangs, restarts, reloads), for /status and the TUI."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Listener = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """One thing that happened to the daemon or a replica."""

    time: float
    kind: str
    replica: str | None
    message: str
    cause: str | None = None
    model: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"time": self.time, "kind": self.kind, "replica": self.replica,
                "message": self.message, "cause": self.cause}


class Events:
    """Keeps the latest events and tells listeners (metrics) about each."""

    def __init__(self, keep: int = 200) -> None:
        self._events: deque[Event] = deque(maxlen=keep)
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, replica: str | None, message: str, *,
             cause: str | None = None, model: str | None = None) -> Event:
        event = Event(time.time(), kind, replica, message, cause, model)
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def latest(self, n: int = 50) -> list[Event]:
        return list(self._events)[-n:]
