"""The aiohttp application: middlewares (request id, auth, errors, metrics) and the route table."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import deadline
from gateway.anthropic import error_body as anthropic_error_body
from gateway.appkeys import API_KEY, CONTEXT, FINISH_REASON, REQUEST_ID, RESPONSE_STORE
from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.context import GatewayContext
from gateway.errors import APIError
from gateway.rate_limit import RateLimiter
from gateway.response_store import ResponseStore
from gateway.routes import (
    anthropic_routes,
    embeddings_routes,
    health,
    lora_routes,
    openai_routes,
    openapi,
    responses_routes,
)
from services.common import telemetry
from services.common.logging import request_id_var

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes that need no API key (probes and scrapers).
_OPEN_PATHS = {"/health", "/metrics", "/ping", "/openapi.json"}

# nginx's "client closed request": what a request whose client went away is counted as, so that
# 5xx counts (and alerts on them) mean server faults.
CLIENT_CLOSED_REQUEST = 499


def _closed_by_client(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` ended the handler because the client went away (logged at info if so)."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        return False
    log.info(
        "client closed the connection before the response ended: %s %s (%s)",
        request.method,
        request.path,
        type(exc).__name__,
    )
    return True


def _client_request_id(request: web.Request) -> str:
    """The caller's X-Request-Id when it is a sane token (it ends up in logs and worker ids)."""
    value = request.headers.get("X-Request-Id", "")
    if 0 < len(value) <= 128 and all(c.isalnum() or c in "-_.:" for c in value):
        return value
    return ""


def error_response(err: APIError, path: str = "") -> web.Response:
    """The error in OpenAI's envelope, or Anthropic's under Anthropic's routes."""
    body = anthropic_error_body(err) if path.startswith(anthropic_routes.PATH_PREFIX) else err.body()
    return web.json_response(body, status=err.status, headers=err.headers())


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's envelope; nothing unexpected leaks a trace to the client."""
    ctx = request.app[CONTEXT]
    started = time.monotonic()
    route = "unmatched"
    if request.match_info.route.resource is not None:
        route = request.match_info.route.resource.canonical
    request_id = _client_request_id(request) or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    request_id_var.set(request_id)
    status = 500
    try:
        try:
            deadline.start(
                deadline.timeout_from_header(request.headers.get(deadline.HEADER), ctx.config.request_timeout)
            )
            response = await handler(request)
        except asyncio.CancelledError as exc:
            # A client that disconnects cancels its handler (handler_cancellation): not a server
            # fault. A cancellation with the client still there (shutdown) stays a 500.
            if _closed_by_client(request, exc):
                status = CLIENT_CLOSED_REQUEST
            raise
        except APIError as err:
            response = error_response(err, request.path)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(
                APIError(
                    413, f"request body is larger than --max-request-bytes ({ctx.config.max_request_bytes})"
                ),
                request.path,
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason if exc.status != 404 else f"no route {request.method} {request.path}"
            headers = {}
            if exc.status == 405:
                message = f"method {request.method} not allowed on {request.path}"
                headers["Allow"] = exc.headers.get("Allow", "")
            response = error_response(APIError(exc.status, message, headers=headers), request.path)
        except Exception as exc:
            # A write to a client that has gone (before its cancellation arrives) fails so.
            if isinstance(exc, ConnectionError) and _closed_by_client(request, exc):
                status = CLIENT_CLOSED_REQUEST
                raise
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(
                APIError(500, "internal server error", code="internal_error"), request.path
            )
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
            # W3C Server-Timing: time spent in the gateway (what the overload tests bound).
            response.headers["Server-Timing"] = f"total;dur={(time.monotonic() - started) * 1000:.1f}"
            if ctx.drain.draining:
                response.force_close()  # clients reconnect elsewhere
        return response
    finally:
        if route.startswith("/v1/") or route in ("/tokenize", "/detokenize"):
            ctx.metrics.count_request(route, status, request.get(FINISH_REASON, ""))
        if (
            route in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
            and status == 200
        ):
            ctx.metrics.e2e.observe(time.monotonic() - started)


def auth_middleware(keys: KeyRing, limiter: RateLimiter) -> Middleware:
    """401 without a valid key (when keys are configured); 429 past the key's request rate."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys.enabled and request.path not in _OPEN_PATHS:
            authorization = request.headers.get("Authorization", "")
            if not authorization and "x-api-key" in request.headers:  # Anthropic's SDKs send this header
                authorization = f"Bearer {request.headers['x-api-key']}"
            key = keys.authenticate(authorization)
            limiter.check(key)
            if key is not None:
                request[API_KEY] = key
        return await handler(request)

    return check


@web.middleware
async def body_size_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONTEXT].config
    limit = config.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(
            413,
            f"request body of {request.content_length} bytes is larger than --max-request-bytes ({limit})",
        )
    if request.body_exists:
        # The whole body within --body-timeout: a client trickling it cannot hold a handler (and
        # its connection) for ever. read() keeps the bytes for the handler's json().
        try:
            await asyncio.wait_for(request.read(), config.body_timeout)
        except asyncio.TimeoutError:
            # Nor may it hold the connection after the 408: aiohttp would read ("linger" on) the
            # rest of an unfinished body for another 10 s before closing; close at once instead.
            request.protocol._lingering_time = 0.0  # type: ignore[union-attr]
            raise APIError(
                408,
                f"the request body did not arrive within --body-timeout ({config.body_timeout:g}s)",
                headers={"Connection": "close"},
            ) from None
    return await handler(request)


def build_app(config: GatewayConfig) -> web.Application:
    ctx = GatewayContext.create(config)
    app = web.Application(
        client_max_size=config.max_request_bytes,
        middlewares=[
            *telemetry.aiohttp_middlewares(),  # outermost: the HTTP span (empty when tracing is off)
            errors_middleware,
            ctx.drain.middleware(),
            auth_middleware(ctx.keys, ctx.rate_limiter),
            body_size_middleware,
        ],
    )
    app[CONTEXT] = ctx

    store = None
    if config.responses_db:
        store = ResponseStore(str(Path(config.responses_db).expanduser()), config.responses_ttl)
        app[RESPONSE_STORE] = store

    async def on_startup(_: web.Application) -> None:
        if store is not None:
            try:
                await store.open()  # creates or migrates the file
            except (OSError, sqlite3.Error) as exc:
                if config.responses_db != GatewayConfig.responses_db:
                    raise  # a path the operator chose must work
                log.warning("storing Responses is off: %s: %s", store.path, exc)
        await ctx.start()

    async def on_cleanup(_: web.Application) -> None:
        await ctx.close()
        if store is not None:
            await store.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    openai_routes.register(app)
    anthropic_routes.register(app)
    responses_routes.register(app)
    embeddings_routes.register(app)
    lora_routes.register(app)
    return app
