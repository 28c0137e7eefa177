"""`GET /openapi.json`: the OpenAPI description of what this gateway accepts."""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import CONTEXT
from gateway.openapi import openapi_document


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[CONTEXT].limits))
