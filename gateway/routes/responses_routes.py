"""OpenAI's Responses API: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`.

Translated onto the chat pipeline (gateway/responses_api.py). Streams are typed SSE events
(`event: response.created` ... `event: response.completed`); an error after the stream started is
a `response.failed` event. With `store` (the default), the response and its conversation are kept
in the response store (--responses-db) for `previous_response_id`, `retrieve` and `delete`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gateway import pipeline
from gateway.appkeys import API_KEY, CONTEXT, FINISH_REASON, REQUEST_ID, RESPONSE_STORE
from gateway.errors import APIError
from gateway.media import rename_image_part
from gateway.protocol import ChatRequest
from gateway.response_store import ResponseStore, StoredResponse
from gateway.responses import ChatResult
from gateway.responses_api import ResponseBuilder, output_messages, responses_param, to_chat_body
from gateway.routes.body import read_json
from gateway.streaming import encode_event
from gateway.validation import parse_chat

log = logging.getLogger(__name__)


def _store(request: web.Request) -> ResponseStore:
    store = request.app.get(RESPONSE_STORE)
    if store is None or not store.is_open:
        raise APIError(400, "storing responses is off on this gateway (--responses-db '')", param="store")
    return store


def _not_found(response_id: str) -> APIError:
    return APIError(
        404, f"no response with id '{response_id}' (unknown, deleted or expired)", param="response_id"
    )


async def create(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise APIError(400, "'previous_response_id' must be a string", param="previous_response_id")
        stored = await _store(request).get(previous)
        if stored is None:
            raise APIError(404, f"previous response '{previous}' not found", param="previous_response_id")
        history = [*stored.messages, *output_messages(stored.response.get("output", []))]
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise APIError(400, "'store' must be a boolean", param="store")
    if store:
        _store(request)
    image_names: list[str] = []
    chat_body, conversation = to_chat_body(body, history, image_names)
    try:
        req = parse_chat(chat_body, ctx.limits)
        return await _run(request, body, chat_body, req, conversation, store)
    except APIError as err:
        # Chat's names of image parts (fetching, decoding) -> this request's `input[i].content[j]`.
        rename_image_part(err, chat_body["messages"], image_names)
        err.param = responses_param(err.param)
        raise


async def _run(
    request: web.Request,
    body: dict[str, Any],
    chat_body: dict[str, Any],
    req: ChatRequest,
    conversation: list[dict[str, Any]],
    store: bool,
) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    request_id = request[REQUEST_ID]
    async with pipeline.chat(ctx, req, request_id, request.get(API_KEY)) as job:
        assert isinstance(job.result, ChatResult)  # pipeline.chat makes chat results
        builder = ResponseBuilder(body, chat_body, job.result.model, job.result)

        async def keep() -> None:
            if store:
                await _store(request).put(
                    StoredResponse(builder.id, conversation, _input_items(body), builder.response(job.run))
                )

        if not req.params.stream:
            async for update in job.updates:
                builder.add(update)
            request[FINISH_REASON] = job.finish_reason()
            await keep()
            return web.json_response(builder.response(job.run))
        first = await anext(job.updates, None)  # an error before any output keeps its status
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
            for event in builder.start_events():
                await response.write(encode_event(event))
            if first is not None:
                for event in builder.add(first):
                    await response.write(encode_event(event))
            async for update in job.updates:
                for event in builder.add(update):
                    await response.write(encode_event(event))
            end = builder.end_events(job.run)
            await keep()
            for event in end:
                await response.write(encode_event(event))
        except APIError as err:
            failed = builder.response(job.run, status="failed")
            failed["error"] = {"code": err.code or err.type, "message": err.message}
            await response.write(encode_event(builder._event("response.failed", response=failed)))
        except (ConnectionResetError, ConnectionError):
            raise
        except Exception:
            log.exception("error while streaming a response")
            failed = builder.response(job.run, status="failed")
            failed["error"] = {"code": "server_error", "message": "internal server error"}
            await response.write(encode_event(builder._event("response.failed", response=failed)))
        await response.write_eof()
        request[FINISH_REASON] = job.finish_reason()
        return response


def _input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    items: list[dict[str, Any]] = value if isinstance(value, list) else []
    return [item if "type" in item else {"type": "message", **item} for item in items]


async def retrieve(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    stored = await _store(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return web.json_response(stored.response)


async def delete(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await _store(request).delete(response_id):
        raise _not_found(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def input_items(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    stored = await _store(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    items = [{"id": f"item_{i}", **item} for i, item in enumerate(stored.input_items)]
    return web.json_response(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
    )


def register(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", input_items)
