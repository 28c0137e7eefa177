"""Errors in OpenAI's envelope (downstream gRPC failures map onto them in `grpc_errors.py`).

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

No stack trace ever reaches a client: anything unexpected becomes a 500 with a generic message
(the trace goes to the log with the request id).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error a client should see, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.extra_headers = dict(headers or {})

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        if self.status == 401:  # RFC 9110: a 401 says how to authenticate
            headers.setdefault("WWW-Authenticate", "Bearer")
        return headers


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def one_line(text: str, limit: int = 300) -> str:
    """A downstream message as a client sees it: its lines up to any backtrace or traceback, joined
    into one line of at most `limit` characters (a compiler's multi-line report keeps its gist)."""
    kept: list[str] = []
    for line in text.strip().splitlines():
        if _TRACE_START.match(line):
            break
        kept.append(line.strip())
    joined = " ".join(" ".join(kept).split())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


_TRACE_START = re.compile(
    r"\s*(stack backtrace:|note: run with `RUST_BACKTRACE|Traceback \(most recent call last\)|\d+: 0x)"
)
