"""A background task that polls now and then every `interval_s` seconds (health, load).

A failing poll is logged and the next one runs anyway: the poller never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, poll_once: Callable[[], Awaitable[None]], interval_s: float, what: str) -> None:
        self.poll_once = poll_once
        self.interval_s = interval_s
        self.what = what
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Poll once (so the state is known before serving), then keep polling in the background."""
        await self.poll_once()
        self._task = asyncio.create_task(self._forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("%s poll failed", self.what)
