"""Speak systemd's sd_notify protocol over NOTIFY_SOCKET without a library."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str | None:
    """Map NOTIFY_SOCKET to an AF_UNIX address; None for kinds we do not speak (vsock:)."""
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    """Keep a STATUS= value on one line; a newline would start another assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """Send READY/STATUS/WATCHDOG/RELOADING/STOPPING to systemd; a no-op outside it."""

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            logger.debug("ignored NOTIFY_SOCKET %r: unsupported address kind", raw)
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        if unset_environment and environ is None:
            # Children (llama-server, ollama) must not inherit the socket or the watchdog.
            for key in _ENV_KEYS:
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of newline-joined KEY=VALUE lines; True when sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            logger.debug("failed to notify systemd (%s): %s", payload[:80], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) finished."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """Set the free-form status line that `systemctl status` shows."""
        return self.notify("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """Ping the service watchdog (WatchdogSec=)."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """Announce a reload; send ready() when it is done (Type=notify-reload wants the clock)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Announce an orderly shutdown."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (EXTEND_TIMEOUT_USEC), e.g. while a model downloads."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when not asked."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                logger.debug("ignored WATCHDOG_PID %r: not an integer", self._watchdog_pid)
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            logger.debug("ignored WATCHDOG_USEC %r: not an integer", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000
