"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Translated onto the chat pipeline (gateway/anthropic.py). Streams use Anthropic's typed events
(`event: message_start` ... `event: message_stop`); an error after the stream started is an
`event: error`. Errors before it are Anthropic's envelope with the HTTP status (the app's error
middleware picks the envelope by path, so 401 / 413 / 429 from middlewares match too).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from gateway import pipeline
from gateway.anthropic import MessageBuilder, anthropic_param, error_body, to_chat_body
from gateway.appkeys import API_KEY, CONTEXT, FINISH_REASON, REQUEST_ID
from gateway.errors import APIError
from gateway.execution import Executor
from gateway.media import rename_image_part
from gateway.protocol import ChatRequest
from gateway.responses import ChatResult
from gateway.routes.body import read_json
from gateway.streaming import encode_event
from gateway.validation import parse_chat

log = logging.getLogger(__name__)

PATH_PREFIX = "/v1/messages"


@contextlib.contextmanager
def _anthropic_names(chat_body: dict[str, Any], image_names: list[str]) -> Iterator[None]:
    """Errors of the chat pipeline named in Anthropic's fields (image parts by their block)."""
    try:
        yield
    except APIError as err:
        rename_image_part(err, chat_body["messages"], image_names)
        err.param = anthropic_param(err.param)
        raise


async def messages(request: web.Request) -> web.StreamResponse:
    image_names: list[str] = []
    chat_body = to_chat_body(await read_json(request), image_names=image_names)
    with _anthropic_names(chat_body, image_names):
        req = parse_chat(chat_body, request.app[CONTEXT].limits)
        return await _messages(request, req)


async def _messages(request: web.Request, req: ChatRequest) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
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
    image_names: list[str] = []
    chat_body = to_chat_body(await read_json(request), count_only=True, image_names=image_names)
    chat_body["max_tokens"] = 1
    with _anthropic_names(chat_body, image_names):
        req = parse_chat(chat_body, ctx.limits)
        executor = Executor(ctx, chat=True)
        executor.check_model(req.model)
        prompt = await executor.render_chat(req)
    return web.json_response({"input_tokens": len(prompt.token_ids)})


def register(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
