"""Watch the config file and Modelfiles (watchdog); a change asks for a reload, debounced."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

logger = logging.getLogger(__name__)

DEBOUNCE_S = 0.5
WRITES = frozenset({"created", "modified", "moved", "deleted", "closed"})


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: ConfigWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reading a file (as a reload does) raises opened/closed_no_write: not a change.
        if event.event_type not in WRITES:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = raw.decode() if isinstance(raw, bytes) else raw
            if path and Path(path).resolve() in self.watcher.files:
                self.watcher.touched()


class ConfigWatcher:
    """Calls `on_change` in the event loop once a burst of edits has settled."""

    def __init__(self, files: list[Path], loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[], None]) -> None:
        self.files = {f.resolve() for f in files}
        self.loop = loop
        self.on_change = on_change
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        observer = Observer()
        handler = _Handler(self)
        for folder in {f.parent for f in self.files}:
            observer.schedule(handler, str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def update(self, files: list[Path]) -> None:
        """Watch a new set of files (after a reload added or removed a Modelfile)."""
        new = {f.resolve() for f in files}
        if new != self.files:
            self.stop()
            self.files = new
            self.start()

    def touched(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(DEBOUNCE_S, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        logger.info("changed: config files; reloading")
        self.loop.call_soon_threadsafe(self.on_change)

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None
