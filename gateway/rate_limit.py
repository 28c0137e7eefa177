"""Per-API-key rate limits: requests and tokens per minute, over a sliding 60-second window.

A request is checked when it arrives: past the key's request limit, or with the key's tokens of
the last minute already at its token limit, it gets 429 with `Retry-After` (seconds until enough
of the window has expired). Requests are counted on arrival; tokens (prompt + completion) are
counted when the request ends, because only then are they known.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.auth import ApiKey
from gateway.errors import APIError

WINDOW_S = 60.0


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)  # arrival times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (end time, tokens)
    num_tokens: int = 0  # sum of `tokens` in the window

    def expire(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.num_tokens -= self.tokens.popleft()[1]


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[bytes, _Usage] = {}

    def check(self, key: ApiKey | None) -> None:
        """Count a request of `key`, or refuse it with 429 + Retry-After."""
        if key is None or not (key.requests_per_minute or key.tokens_per_minute):
            return
        now = self.clock()
        usage = self._usage.setdefault(key.secret, _Usage())
        usage.expire(now)
        rpm, tpm = key.requests_per_minute, key.tokens_per_minute
        if rpm and len(usage.requests) >= rpm:
            wait = WINDOW_S - (now - usage.requests[0])
            raise _limited(f"rate limit of {rpm} requests per minute reached for this API key", wait)
        if tpm and usage.num_tokens >= tpm:
            # Enough of the window must expire to bring the key back under its limit.
            excess, wait = usage.num_tokens - tpm, 0.0
            for at, tokens in usage.tokens:
                excess -= tokens
                wait = WINDOW_S - (now - at)
                if excess < 0:
                    break
            raise _limited(f"rate limit of {tpm} tokens per minute reached for this API key", wait)
        usage.requests.append(now)

    def add_tokens(self, key: ApiKey | None, num_tokens: int) -> None:
        """Charge the tokens a finished request used to its key."""
        if key is None or not key.tokens_per_minute or num_tokens <= 0:
            return
        usage = self._usage.setdefault(key.secret, _Usage())
        usage.tokens.append((self.clock(), num_tokens))
        usage.num_tokens += num_tokens


def _limited(message: str, wait_s: float) -> APIError:
    return APIError(429, message, code="rate_limit_exceeded", retry_after_s=max(1, math.ceil(wait_s)))
