"""A steady load of streaming completions for supervision tests, classifying every outcome."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

BODY = {"prompt": "Once upon a time", "max_tokens": 16, "stream": True}


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    kind: str  # "ok" | "error" (a clean error: status, error event, or a refused connection) | "hung"
    detail: str = ""


@dataclass
class Load:
    """`concurrency` clients sending streaming requests back to back until `stop()`."""

    url: str
    concurrency: int = 3
    timeout_s: float = 30.0  # a stream that takes longer than this counts as hung
    outcomes: list[Outcome] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    async def _one(self, session: aiohttp.ClientSession) -> Outcome:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with session.post(self.url + "/v1/completions", json=BODY) as reply:
                    text = await reply.text()
                    if reply.status != 200:
                        error = json.loads(text)["error"]  # (an error envelope, whatever the status)
                        detail = f"HTTP {reply.status}: {error.get('message', '')[:300]}"
                        return Outcome(started, time.monotonic(), "error", detail)
                    if not text.endswith("data: [DONE]\n\n"):
                        return Outcome(started, time.monotonic(), "hung", "stream ended without [DONE]")
                    if '"error"' in text:
                        return Outcome(started, time.monotonic(), "error", "error event")
                    return Outcome(started, time.monotonic(), "ok")
        except TimeoutError:
            return Outcome(started, time.monotonic(), "hung", "no end within the client timeout")
        except (aiohttp.ClientError, ConnectionError) as exc:
            return Outcome(started, time.monotonic(), "error", type(exc).__name__)

    async def _client(self) -> None:
        # force_close: no keep-alive, so a restarted gateway is not hit through a dead connection.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            while not self._stopping:
                outcome = await self._one(session)
                self.outcomes.append(outcome)
                if outcome.kind != "ok":
                    await asyncio.sleep(0.05)  # a failing stack is not hammered in a tight loop

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    def after(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= t]

    async def served(self, since: float, count: int = 10, timeout_s: float = 60.0) -> None:
        """Wait until `count` streams started at or after `since` have ended (a condition, not a
        fixed time: the load has run that much on the stack as it is now)."""
        deadline = time.monotonic() + timeout_s
        while len(self.after(since)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} streams ended in {timeout_s}s"
            await asyncio.sleep(0.02)
