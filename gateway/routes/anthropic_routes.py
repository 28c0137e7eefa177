"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Translated onto the chat pipeline (gateway/anthropic.py). Streams use Anthropic's typed events
(`event: message_start` ... `event: message_stop`); an error after the stream started is an
`event: error`. Errors before it are Anthropic's envelope with the HTTP status (the app's error
middleware picks the envelope by path, so 401 / 413 / 429 from middlewares match too).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gateway import pipeline
from gateway.anthropic import MessageBuilder, anthropic_param, error_body, to_chat_body
from gateway.appkeys import API_KEY, CONTEXT, FINISH_REASON, REQUEST_ID
from gateway.errors import APIError
from gateway.execution import Executor
from gateway.responses import ChatResult
from gateway.routes.body import read_json
from gateway.streaming import encode_event
from gateway.validation import parse_chat

log = logging.getLogger(__name__)

PATH_PREFIX = "/v1/messages"


def _parse(body: Any, ctx: Any, *, count_only: bool = False) -> Any:
    chat_body = to_chat_body(body, count_only=count_only)
    if count_only:
        chat_body["max_tokens"] = 1
    try:
        return parse_chat(chat_body, ctx.limits)
    except APIError as err:
        err.param = anthropic_param(err.param)
        raise


async def messages(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = _parse(await read_json(request), ctx)
    request_id = request[REQUEST_ID]
    async with pipeline.chat(ctx, req, request_id, request.get(API_KEY)) as job:
        assert isinstance(job.result, ChatResult)  # pipeline.chat makes chat results
        builder = MessageBuilder(request_id, job.result.model, job.result)
        if not req.params.stream:
            async for update in job.updates:
                builder.add(update)
            request[FINISH_REASON] = job.finish_reason()
            return web.json_response(builder.message(job.run))
        # The first update is awaited before the response starts, so an error before any output
        # still gets its own status.
        first = await anext(job.updates, None)
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
            },
        )
        await response.prepare(request)
        try:
            await response.write(encode_event(builder.start_event(job.run)))
            if first is not None:
                for event in builder.add(first):
                    await response.write(encode_event(event))
            async for update in job.updates:
                for event in builder.add(update):
                    await response.write(encode_event(event))
            for event in builder.end_events(job.run):
                await response.write(encode_event(event))
        except APIError as err:
            await response.write(encode_event(error_body(err)))
        except (ConnectionResetError, ConnectionError):
            raise
        except Exception:
            log.exception("error while streaming a message")
            await response.write(encode_event(error_body(APIError(500, "internal server error"))))
        await response.write_eof()
        request[FINISH_REASON] = job.finish_reason()
        return response


async def count_tokens(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    req = _parse(await read_json(request), ctx, count_only=True)
    executor = Executor(ctx, chat=True)
    executor.check_model(req.model)
    prompt = await executor.render_chat(req)
    return web.json_response({"input_tokens": len(prompt.token_ids)})


def register(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
