"""`GET /health` and `GET /metrics`."""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import CONTEXT
from gateway.metrics import CONTENT_TYPE


async def health(request: web.Request) -> web.Response:
    """200 when a styler and at least one worker answer SERVING; 503 (with details) otherwise."""
    ctx = request.app[CONTEXT]
    status = await ctx.health()
    ok = any(status["styler"].values()) and any(status["worker"].values()) and not ctx.drain.draining
    state = "draining" if ctx.drain.draining else "ok" if ok else "unavailable"
    body: dict[str, object] = {"status": state, **status}
    if ctx.config.instance_id:
        body["instance"] = ctx.config.instance_id
    return web.json_response(body, status=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
