"""Reading a JSON request body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import APIError


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 saying what is wrong with it."""
    raw = await request.read()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body
