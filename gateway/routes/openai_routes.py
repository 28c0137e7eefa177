"""The OpenAI routes (`/v1/...`) and vLLM's `/tokenize` and `/detokenize`."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from aiohttp import web

from gateway import pipeline
from gateway.appkeys import API_KEY, CONTEXT, FINISH_REASON, REQUEST_ID
from gateway.errors import APIError
from gateway.execution import Executor
from gateway.grpc_errors import from_grpc
from gateway.routes.body import read_json
from gateway.streaming import sse
from gateway.styler_pool import NoStylerAvailable
from gateway.validation import parse_chat, parse_completion, parse_detokenize, parse_tokenize


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = parse_chat(await read_json(request), ctx.limits)
    job = pipeline.chat(ctx, req, request[REQUEST_ID], request.get(API_KEY))
    return await _respond(request, job, req.params.stream)


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = parse_completion(await read_json(request), ctx.limits)
    job = pipeline.completion(ctx, req, request[REQUEST_ID], request.get(API_KEY))
    return await _respond(request, job, req.params.stream)


async def _respond(
    request: web.Request, job_context: AbstractAsyncContextManager[pipeline.Job], stream: bool
) -> web.StreamResponse:
    """SSE chunks or one JSON body from a pipeline job; records the finish reason for metrics."""
    async with job_context as job:
        if stream:
            response = await sse(request, job.chunk_batches(), request[REQUEST_ID])
        else:
            response = web.json_response(await job.collect())
        request[FINISH_REASON] = job.finish_reason()
        return response


def _model_card(request: web.Request) -> dict[str, Any]:
    ctx = request.app[CONTEXT]
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.started_at,
        "owned_by": "tandem",
        "root": ctx.model_name,
        "parent": None,
        "max_model_len": ctx.max_model_len,
    }


def _model_cards(request: web.Request) -> list[dict[str, Any]]:
    """The base model, then each LoRA adapter (vLLM's cards: `parent` is the base model)."""
    base = _model_card(request)
    adapters = request.app[CONTEXT].router.adapters()
    return [base] + [{**base, "id": name, "root": name, "parent": base["id"]} for name in sorted(adapters)]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _model_cards(request)})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    for card in _model_cards(request):
        if card["id"] == model_id:
            return web.json_response(card)
    raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")


async def tokenize(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    req = parse_tokenize(await read_json(request), ctx.limits)
    Executor(ctx).check_model(req.model)
    try:
        stylers = ctx.stylers
        if req.messages is not None:
            messages = req.messages
            rendered = await stylers.call(
                lambda c: c.render(
                    messages,
                    req.tools,
                    req.add_generation_prompt,
                    req.continue_final_message,
                    req.chat_template,
                    req.chat_template_kwargs,
                )
            )
            tokens = rendered.token_ids
            if req.add_special_tokens:
                tokens = await stylers.call(lambda c: c.tokenize(rendered.prompt, add_special_tokens=True))
        else:
            tokens = await stylers.call(
                lambda c: c.tokenize(req.prompt or "", add_special_tokens=req.add_special_tokens)
            )
        body: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": ctx.max_model_len,
            "tokens": list(tokens),
        }
        if req.return_token_strs:
            body["token_strs"] = [t.text for t in await ctx.token_texts.get(tokens)]
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc, "styler") from None
    except NoStylerAvailable as exc:
        raise APIError(503, str(exc), retry_after_s=1) from None
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    req = parse_detokenize(await read_json(request))
    Executor(ctx).check_model(req.model)
    info = ctx.router.info()
    if info is not None and info.vocab_size and any(t >= info.vocab_size for t in req.tokens):
        raise APIError(400, f"'tokens' must be below the vocabulary size {info.vocab_size}", param="tokens")
    try:
        text = await ctx.stylers.call(lambda c: c.detokenize(req.tokens))
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc, "styler") from None
    except NoStylerAvailable as exc:
        raise APIError(503, str(exc), retry_after_s=1) from None
    return web.json_response({"prompt": text})


def register(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
