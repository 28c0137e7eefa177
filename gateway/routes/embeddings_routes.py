"""OpenAI's embeddings route: `POST /v1/embeddings` (gateway/embeddings.py does the work)."""

from __future__ import annotations

from aiohttp import web

from gateway import embeddings
from gateway.appkeys import API_KEY, CONTEXT, REQUEST_ID
from gateway.routes.body import read_json


async def create_embeddings(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    req = embeddings.parse_embeddings(await read_json(request), ctx.limits)
    result = await embeddings.embed(ctx, req, request[REQUEST_ID], request.get(API_KEY))
    return web.json_response(result.response(req.encoding_format))


def register(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", create_embeddings)
