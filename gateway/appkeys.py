"""Typed keys of the aiohttp application and request storage."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import ApiKey
from gateway.context import GatewayContext
from gateway.response_store import ResponseStore

CONTEXT = web.AppKey("context", GatewayContext)
REQUEST_ID = web.RequestKey("request_id", str)
# Finish reason of a generation request, for the requests_total metric.
FINISH_REASON = web.RequestKey("finish_reason", str)
# The API key that authenticated the request (None when keys are off), for its token rate limit.
API_KEY = web.RequestKey("api_key", ApiKey)
# Stored Responses (None when --responses-db is "").
RESPONSE_STORE = web.AppKey("response_store", ResponseStore)
