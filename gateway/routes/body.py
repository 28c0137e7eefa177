"""Reading a JSON request body."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import json_text
from gateway.errors import APIError


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 saying what is wrong with it (also for nesting
    too deep and lone surrogates, naming the field: see `json_text`)."""
    raw = await request.read()
    body = json_text.loads(raw or b"null")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body
