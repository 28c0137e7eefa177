"""Admission control: bounded queues of requests (and of their prompt tokens) at the gateway.

A request is *waiting* from admission until its first token, then *running*. It counts as its
sequences (prompts x n: what the workers schedule) in the waiting queue. Beyond `--max-waiting`
waiting sequences, or `--max-waiting-tokens` prompt tokens waiting, a new request is refused at
once with 429 + Retry-After instead of joining an unbounded queue (so overload shows up as fast
refusals, not as latency for everyone). A lone request is always let in (its size is bounded by
`--max-sequences-per-request` and the context length), so a big one cannot be refused for ever.
`--max-running` caps the requests in flight; further admitted requests wait for a slot, at most
until their deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.deadline import time_left
from gateway.errors import APIError


@dataclass
class Admission:
    """One admitted request: waiting until `started()`, then running until it ends."""

    gate: AdmissionGate
    num_sequences: int = 1  # counted in the gate's waiting sequences until started
    running: bool = False
    num_tokens: int = 0  # prompt tokens counted in the gate's waiting tokens

    def add_tokens(self, num_tokens: int) -> None:
        """Count the request's prompt tokens as waiting; 429 when that overflows the token queue."""
        if self.running or num_tokens <= 0:
            return
        self.gate.check_tokens(num_tokens)
        gate = self.gate
        self.num_tokens += num_tokens
        gate.num_waiting_tokens += num_tokens

    def _release_tokens(self) -> None:
        self.gate.num_waiting_tokens -= self.num_tokens
        self.num_tokens = 0

    def started(self) -> None:
        if not self.running:
            self.running = True
            self._release_tokens()
            self.gate.num_waiting -= self.num_sequences
            self.gate.num_running += 1


@dataclass
class AdmissionGate:
    max_waiting: int
    max_running: int  # 0 = no gateway-side limit
    max_waiting_tokens: int = 0  # 0 = no limit
    num_waiting: int = 0
    num_running: int = 0
    num_waiting_tokens: int = 0
    _slots: asyncio.Semaphore | None = field(default=None)

    def __post_init__(self) -> None:
        if self.max_running > 0:
            self._slots = asyncio.Semaphore(self.max_running)

    @property
    def num_in_flight(self) -> int:
        return self.num_waiting + self.num_running

    def check_tokens(self, num_tokens: int) -> None:
        """429 when `num_tokens` more prompt tokens (known or a lower bound) overflow the token
        queue; a lone request is always let in, so one long prompt cannot be refused for ever."""
        if (
            self.max_waiting_tokens
            and num_tokens > 0
            and self.num_waiting_tokens > 0
            and self.num_waiting_tokens + num_tokens > self.max_waiting_tokens
        ):
            raise APIError(
                429,
                f"too many prompt tokens waiting ({self.num_waiting_tokens} + {num_tokens} > "
                f"--max-waiting-tokens {self.max_waiting_tokens}); retry later",
                code="queue_full",
                retry_after_s=1,
            )

    @asynccontextmanager
    async def admit(self, num_sequences: int = 1, min_tokens: int = 0) -> AsyncIterator[Admission]:
        """Admit a request of `num_sequences` sequences (prompts x n) and at least `min_tokens`
        prompt tokens (a bound known before tokenizing), or refuse it with 429 + Retry-After when
        the waiting queue is full."""
        if self.num_waiting >= self.max_waiting or (
            self.num_waiting and self.num_waiting + num_sequences > self.max_waiting
        ):
            raise APIError(
                429,
                f"too many sequences waiting ({self.num_waiting} + {num_sequences} > --max-waiting "
                f"{self.max_waiting}); retry later",
                code="queue_full",
                retry_after_s=1,
            )
        self.check_tokens(min_tokens)
        admission = Admission(self, num_sequences)
        self.num_waiting += num_sequences
        acquired = False
        try:
            if self._slots is not None:
                try:
                    await asyncio.wait_for(self._slots.acquire(), time_left())
                except asyncio.TimeoutError:
                    raise APIError(
                        504, "the request timed out waiting for a free slot (--max-running)", code="timeout"
                    ) from None
                acquired = True
            yield admission
        finally:
            if admission.running:
                self.num_running -= 1
            else:
                admission._release_tokens()
                self.num_waiting -= num_sequences
            if acquired and self._slots is not None:
                self._slots.release()
