"""Request deadlines: a client's timeout becomes the gRPC deadline of every downstream call.

The deadline is set once where a request enters (HTTP: `--request-timeout`, lowered by an
`X-Request-Timeout: <seconds>` header; gRPC: the caller's own deadline) and kept in a context
variable, which asyncio copies into every task the request starts. Each styler and worker call
then passes the time left as its gRPC timeout, so the worker sees the same deadline and drops
the request (freeing its KV blocks) when it passes, instead of computing tokens nobody reads.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar

from gateway.errors import APIError, invalid

HEADER = "X-Request-Timeout"

# time.monotonic() at which the current request must be over; None = no deadline.
deadline_var: ContextVar[float | None] = ContextVar("tandem_request_deadline", default=None)


def start(timeout_s: float | None) -> None:
    """Give the current request `timeout_s` seconds from now (None or 0: no deadline)."""
    deadline_var.set(time.monotonic() + timeout_s if timeout_s else None)


def timeout_from_header(value: str | None, configured_s: float) -> float | None:
    """The request's timeout: the configured one, lowered by a valid X-Request-Timeout header."""
    limit = configured_s or None
    if value is None:
        return limit
    try:
        asked = float(value)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked <= 0:
        raise invalid(f"header {HEADER} must be a positive number of seconds, got {value[:40]!r}", HEADER)
    return asked if limit is None else min(asked, limit)


def expired() -> bool:
    """Whether the current request had a deadline and it has passed."""
    deadline = deadline_var.get()
    return deadline is not None and time.monotonic() >= deadline


def time_left(cap_s: float | None = None) -> float | None:
    """Seconds left before the deadline (at most `cap_s`); None when neither bounds the call.

    Raises 504 when the deadline has already passed, so no downstream call starts late.
    """
    deadline = deadline_var.get()
    if deadline is None:
        return cap_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise APIError(504, "the request timed out (X-Request-Timeout / --request-timeout)", code="timeout")
    return left if cap_s is None else min(left, cap_s)
