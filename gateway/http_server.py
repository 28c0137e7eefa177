"""The aiohttp server under the app, so that errors aiohttp answers itself use OpenAI's envelope.

aiohttp's HTTP parser refuses some requests before any middleware runs (a request line or
header longer than 8,190 bytes, a malformed request line or header, a bad chunked body), and
answers them from `RequestHandler.handle_error` with plain text that echoes the offending bytes.
`GatewayRunner` is `web.AppRunner` with a request handler whose `handle_error` answers with the
envelope instead (status from aiohttp, a fixed message, the connection closed as aiohttp does).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import APIError


def _message(status: int, exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return "the request line or a header is too long (at most 8190 bytes each)"
    if isinstance(exc, BadHttpMethod):
        return "the request line is not a valid HTTP request line"
    if isinstance(exc, HttpProcessingError) or status == 400:
        return "malformed HTTP request"
    if status == 504:
        return "the request timed out"
    return "internal server error"


class _EnvelopeRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling logs, and raises when part of a response was already sent.
        super().handle_error(request, status, exc, message)
        err = APIError(status, _message(status, exc), code="internal_error" if status == 500 else None)
        response = web.json_response(err.body(), status=status, headers=err.headers())
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parser errors in OpenAI's envelope."""

    async def _make_server(self) -> web.Server:
        server: Any = await super()._make_server()
        return _EnvelopeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
