"""Admission control: how many requests wait for their first token, and the --max-waiting cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.errors import APIError


@dataclass
class Admission:
    """One admitted request: waiting until `started()`, then running until it ends."""

    gate: AdmissionGate
    running: bool = False

    def started(self) -> None:
        if not self.running:
            self.running = True
            self.gate.num_waiting -= 1
            self.gate.num_running += 1


@dataclass
class AdmissionGate:
    max_waiting: int
    max_running: int  # 0 = no gateway-side limit
    num_waiting: int = 0
    num_running: int = 0
    _slots: asyncio.Semaphore | None = field(default=None)

    def __post_init__(self) -> None:
        if self.max_running > 0:
            self._slots = asyncio.Semaphore(self.max_running)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Admission]:
        """Admit a request or refuse it with 429 + Retry-After when the waiting queue is full."""
        if self.num_waiting >= self.max_waiting:
            raise APIError(
                429,
                f"too many requests waiting ({self.num_waiting} >= --max-waiting {self.max_waiting}); retry later",
                code="queue_full",
                retry_after_s=1,
            )
        admission = Admission(self)
        self.num_waiting += 1
        acquired = False
        try:
            if self._slots is not None:
                await self._slots.acquire()
                acquired = True
            yield admission
        finally:
            if admission.running:
                self.num_running -= 1
            else:
                self.num_waiting -= 1
            if acquired and self._slots is not None:
                self._slots.release()
