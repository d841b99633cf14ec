"""`serve`: wire config, plan, replicas, HTTP, signals, sd_notify and reload together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .api import COMPLETIONS, build_app
from .config import Config, load_config
from .daemon import Prepared, Supervisor, prepare
from .events import Event, Events
from .fastpath import FastConnection
from .gpus import Inventory
from .listener import Listener
from .metrics import Metrics
from .ollama_residency import OllamaResidency
from .openai_compat import Usage
from .probes import HttpProber
from .process import OsRunner, PidRegistry
from .proxy import Proxy
from .sdnotify import Notifier
from .upstream import Upstream
from .watch import ConfigWatcher

logger = logging.getLogger(__name__)


@dataclass
class Signals:
    """What the signal handlers recorded; the loop acts on it."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    """One running daemon: start, serve until told to stop, shut down in order."""

    def __init__(self, config: Config, config_path: Path | None, inventory: Inventory) -> None:
        self.config = config
        self.config_path = config_path
        self.inventory = inventory
        self.signals = Signals()
        self.notifier = Notifier(unset_environment=True)
        self.events = Events()
        self.metrics = Metrics()
        self.sup: Supervisor | None = None
        self.port: int | None = None
        self._reloading = asyncio.Lock()

    async def _prepare(self, config: Config) -> Prepared:
        return await asyncio.to_thread(prepare, config, self.inventory, progress=True)

    async def reload(self) -> dict[str, Any]:
        """Parse and validate everything first; on any error keep the running config."""
        assert self.sup is not None
        if self.config_path is None:
            raise RuntimeError("running the embedded default: there is no file to reload")
        async with self._reloading:
            self.notifier.reloading()
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
                if config.server != self.sup.config.server:
                    logger.warning("reload: server settings changed; they apply at restart")
                    config = _keep_server(config, self.sup.config)
                prepared = await self._prepare(config)
                diff = await self.sup.reload(prepared)
            except Exception as exc:
                self.sup.reload_error = str(exc)
                self.events.emit("reload_error", None, str(exc))
                logger.error("refused reload, the running config stays: %s", exc)
                raise
            finally:
                self.notifier.ready(self.sup.summary())
            return diff

    def _on_event(self, event: Event) -> None:
        model = event.model or "-"
        if event.kind in ("hang", "crash") and event.cause:
            self.metrics.hang(model, event.cause)
        if event.kind == "restart" and event.cause:
            self.metrics.restart(model, event.cause)
        if event.kind == "eviction":
            self.metrics.eviction(model)

    def _observe(self, model: str, path: str, status: int, latency: float,
                 ttft: float | None, usage: Usage | None) -> None:
        u = usage or Usage()
        self.metrics.observe_request(model, path, status, latency, ttft,
                                     u.prompt, u.completion, u.cached)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        server = self.config.server
        registry = PidRegistry(server.state_dir / "children.json")
        for pid in registry.reap_leftovers():
            self.events.emit("error", None, f"reaped leftover child pid {pid}")
        prepared = await self._prepare(self.config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signals.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.signals.reload.set)
        # llama-server closes idle connections after 5 s; reusing one it closed would
        # spend a request's one failover on nothing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False)
        self.events.listen(self._on_event)
        residency = OllamaResidency(
            session, load_timeout=max(m.load_timeout for m in self.config.models))
        sup = Supervisor(prepared, OsRunner(registry), HttpProber(session), self.events,
                         residency)
        self.sup = sup
        self.metrics.set_provider(sup.status)
        upstream = Upstream()
        proxy = Proxy(upstream, self._observe, self.metrics.observe_queue_wait)
        app = build_app(sup, proxy, server, self.metrics, self.reload)
        # handler_cancellation: a client that goes away cancels its upstream request.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               keepalive_timeout=server.idle_timeout)
        await runner.setup()
        aiohttp_server = runner.server
        assert aiohttp_server is not None  # set by setup()
        completions = app[COMPLETIONS]
        # Completion requests take the lean front door; everything else is aiohttp's.
        listener = Listener(aiohttp_server, max_connections=server.max_connections,
                            header_timeout=server.header_timeout,
                            fast=lambda: FastConnection(completions, aiohttp_server))
        # aiohttp's default backlog (128) overflows when hundreds of clients connect at once.
        self.port = await listener.start(server.host, server.port,
                                         backlog=max(128, server.max_connections))
        sup.connection_stats = listener.stats
        sites: list[web.BaseSite] = []
        if server.admin_socket is not None:
            server.admin_socket.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                server.admin_socket.unlink()
            unix = web.UnixSite(runner, str(server.admin_socket))
            await unix.start()
            server.admin_socket.chmod(0o660)  # the service user and its group
            sites.append(unix)
        logger.info("listening on http://%s:%d", server.host, self.port)
        sup.on_change.append(self.signals.changed.set)
        await sup.start()
        # Everything built so far lives as long as the daemon: move it out of the cyclic
        # collector's way, so a full collection on the hot path walks only what is new.
        gc.collect()
        gc.freeze()
        watcher = None
        if self.config_path is not None:
            watcher = ConfigWatcher(self._watched_files(sup), loop, self.signals.reload.set)
            watcher.start()
        try:
            await self._loop(sup, watcher)
        finally:
            self.notifier.stopping()
            logger.info("stopping: draining for up to %.0fs", server.drain_timeout)
            if watcher is not None:
                watcher.stop()
            await listener.stop()
            for s in sites:
                await s.stop()
            await sup.shutdown(server.drain_timeout)
            await runner.cleanup()
            listener.close_all()
            await upstream.close()
            await session.close()
        logger.info("stopped")
        return 0

    def _watched_files(self, sup: Supervisor) -> list[Path]:
        files = [m.modelfile for m in sup.config.models]
        if self.config_path is not None:
            files.append(self.config_path)
        return files

    async def _loop(self, sup: Supervisor, watcher: ConfigWatcher | None) -> None:
        announced = False
        interval = self.notifier.watchdog_interval() or 5.0
        last_summary = ""
        while not self.signals.stop.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in
                     (self.signals.stop, self.signals.reload, self.signals.changed)]
            await asyncio.wait(waits, timeout=min(interval, 5.0),
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            self.notifier.watchdog()
            self.signals.changed.clear()
            if sup.ready() and not announced:
                announced = True
                self.notifier.ready(sup.summary())
                logger.info("ready: %s", sup.summary())
            summary = sup.summary()
            if summary != last_summary:
                self.notifier.status(summary)
                last_summary = summary
            if self.signals.reload.is_set() and not self.signals.stop.is_set():
                self.signals.reload.clear()
                with contextlib.suppress(Exception):
                    await self.reload()
                if watcher is not None:
                    watcher.update(self._watched_files(sup))


def _keep_server(config: Config, running: Config) -> Config:
    from dataclasses import replace

    return replace(config, server=running.server)
