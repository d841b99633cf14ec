"""HTTP probes of a child engine: health and the one-token canary."""

from __future__ import annotations

import logging
from typing import Protocol

import aiohttp

logger = logging.getLogger(__name__)


class Prober(Protocol):
    """Asks an engine whether it is alive; injected so tests can script answers."""

    async def health(self, url: str, timeout: float) -> bool: ...

    async def canary(self, base_url: str, model: str, timeout: float) -> bool: ...

    async def answers(self, url: str, timeout: float) -> bool: ...


class HttpProber:
    """Probes over one shared client session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def _status(self, url: str, timeout: float) -> int | None:
        """The HTTP status of a GET answered in full within `timeout`, else None."""
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def health(self, url: str, timeout: float) -> bool:
        return await self._status(url, timeout) == 200

    async def answers(self, url: str, timeout: float) -> bool:
        """Any HTTP answer within `timeout` (a 501 from `--no-slots` still shows life)."""
        return await self._status(url, timeout) is not None

    async def canary(self, base_url: str, model: str, timeout: float) -> bool:
        """One-token completion: catches an engine whose /health is fine but is wedged."""
        body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0,
                "stream": False}
        try:
            async with self.session.post(
                base_url + "/v1/completions", json=body,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    logger.info("canary answered %d at %s", resp.status, base_url)
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info("canary failed at %s: %r", base_url, exc)
            return False
