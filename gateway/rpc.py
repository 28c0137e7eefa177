"""The public gRPC `tandem.v1.Inference` service (`--grpc-port`).

Each rpc turns its protobuf request into the OpenAI JSON body the HTTP routes receive, runs it
through the same validation (`validation.py`) and execution (`pipeline.py`), and turns the
OpenAI response dicts back into protobuf. So the two front ends cannot drift apart. Like
`clients.py`, this is a protobuf edge: the only other gateway module that imports `*_pb2`.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from gateway import deadline, embeddings, json_text, pipeline
from gateway.appkeys import CONTEXT
from gateway.auth import ApiKey
from gateway.config import GatewayConfig
from gateway.context import GatewayContext
from gateway.errors import APIError, invalid
from gateway.validation import parse_chat, parse_completion
from services.common.logging import request_id_var
from services.common.server import GrpcServer
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_OPTIONAL_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "skip_special_tokens",
    "prompt_logprobs",
    "best_of",
    "length_penalty",
)
# options.early_stopping as the HTTP body's value (validated there)
_EARLY_STOPPING: dict[int, bool | str] = {
    common_pb2.EARLY_STOPPING_FALSE: False,
    common_pb2.EARLY_STOPPING_TRUE: True,
    common_pb2.EARLY_STOPPING_NEVER: "never",
}


def _json_field(text: str, name: str) -> Any:
    return json_text.loads(text, name)


def _options(o: inference_pb2.GenerationOptions, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(o, name) for name in _OPTIONAL_OPTIONS if o.HasField(name)}
    for name in (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "min_p",
        "repetition_penalty",
        "length_penalty",
    ):
        if name in body:  # float32 on the wire: 0.7 arrives as 0.699999988; round back
            body[name] = float(f"{body[name]:.6g}")
    if o.stop:
        body["stop"] = list(o.stop)
    if o.ignore_eos:
        body["ignore_eos"] = True
    if o.stop_token_ids:
        body["stop_token_ids"] = list(o.stop_token_ids)
    if o.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if o.user:
        body["user"] = o.user
    if o.HasField("guided"):
        body.update(_guided(o.guided))
    if o.logit_bias:  # float32 on the wire, rounded back as the other floats
        body["logit_bias"] = {str(t): float(f"{b:.6g}") for t, b in sorted(o.logit_bias.items())}
    if o.use_beam_search:
        body["use_beam_search"] = True
    if o.early_stopping:
        body["early_stopping"] = _EARLY_STOPPING.get(o.early_stopping, int(o.early_stopping))
    body["stream"] = stream
    for name in ("include_usage", "continuous_usage_stats"):
        if getattr(o, name) and not stream:
            raise invalid(f"'{name}' is only allowed on a streaming rpc", f"options.{name}")
        if getattr(o, name):
            body.setdefault("stream_options", {})[name] = True
    return body


def _guided(g: common_pb2.GuidedDecoding) -> dict[str, Any]:
    """`options.guided` as the HTTP body field that means the same (validated there)."""
    kind = g.WhichOneof("constraint")
    if kind == "json_schema":
        return {"guided_json": g.json_schema}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}} if g.json_object else {}
    if kind == "regex":
        return {"guided_regex": g.regex}
    if kind == "choice":
        return {"guided_choice": list(g.choice.values)}
    if kind == "lark_grammar":
        return {"guided_grammar": g.lark_grammar}
    raise invalid("'options.guided' must set one constraint", "options.guided")


def _message(m: common_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    kind = m.WhichOneof("content")
    if kind == "text":
        out["content"] = m.text
    elif kind == "parts":
        out["content"] = [{"type": p.type, "text": p.text} for p in m.parts.parts]
    else:
        out["content"] = None
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": t.id, "type": t.type or "function", "function": {"name": t.name, "arguments": t.arguments}}
            for t in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.HasField("reasoning_content"):
        out["reasoning_content"] = m.reasoning_content
    if m.extra_json:
        extra = _json_field(m.extra_json, "messages.extra_json")
        if not isinstance(extra, dict):
            raise invalid("'messages.extra_json' must be a JSON object", "messages.extra_json")
        out.update({k: v for k, v in extra.items() if k not in out})
    return out


def chat_body(r: inference_pb2.ChatCompletionRequest, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": r.model, "messages": [_message(m) for m in r.messages]}
    body.update(_options(r.options, stream))
    if r.logprobs:
        body["logprobs"] = True
    if r.HasField("top_logprobs"):
        body["top_logprobs"] = r.top_logprobs
    if r.tools_json:
        body["tools"] = _json_field(r.tools_json, "tools_json")
    if r.tool_choice_json:
        body["tool_choice"] = _json_field(r.tool_choice_json, "tool_choice_json")
    if r.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = r.parallel_tool_calls
    if r.HasField("chat_template"):
        body["chat_template"] = r.chat_template
    if r.chat_template_kwargs_json:
        body["chat_template_kwargs"] = _json_field(r.chat_template_kwargs_json, "chat_template_kwargs_json")
    if r.HasField("add_generation_prompt"):
        body["add_generation_prompt"] = r.add_generation_prompt
    if r.continue_final_message:
        body["continue_final_message"] = True
    return body


def completion_body(r: inference_pb2.CompletionRequest, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": r.model}
    kind = r.WhichOneof("prompt")
    if kind == "text":
        body["prompt"] = r.text
    elif kind == "token_ids":
        body["prompt"] = list(r.token_ids.ids)
    body.update(_options(r.options, stream))
    if r.HasField("logprobs"):
        body["logprobs"] = r.logprobs
    if r.echo:
        body["echo"] = True
    return body


def embed_body(r: inference_pb2.EmbedTextRequest) -> dict[str, Any]:
    """The OpenAI embeddings body of an Embed rpc: texts, or token-id lists (one form per call)."""
    kinds = {item.WhichOneof("input") for item in r.inputs}
    if None in kinds:
        raise invalid("'inputs' must each set text or token_ids", "inputs")
    if len(kinds) > 1:
        raise invalid("'inputs' must be all texts or all token ids", "inputs")
    body: dict[str, Any] = {"model": r.model}
    if kinds == {"text"}:
        body["input"] = [item.text for item in r.inputs]
    else:
        body["input"] = [list(item.token_ids.ids) for item in r.inputs]
    if r.HasField("dimensions"):
        body["dimensions"] = r.dimensions
    if r.user:
        body["user"] = r.user
    return body


def _usage(u: dict[str, Any] | None) -> inference_pb2.ResponseUsage | None:
    if not u:
        return None
    return inference_pb2.ResponseUsage(
        prompt_tokens=u["prompt_tokens"],
        completion_tokens=u["completion_tokens"],
        total_tokens=u["total_tokens"],
        cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
    )


def _logprob_entries(logprobs: dict[str, Any] | None) -> list[inference_pb2.LogprobEntry]:
    if not logprobs:
        return []
    return [
        inference_pb2.LogprobEntry(
            token=e["token"],
            logprob=e["logprob"],
            bytes=bytes(e["bytes"]),
            top_logprobs=[
                inference_pb2.LogprobAlternative(
                    token=t["token"], logprob=t["logprob"], bytes=bytes(t["bytes"])
                )
                for t in e["top_logprobs"]
            ],
        )
        for e in logprobs["content"]
    ]


def _prompt_logprobs(entries: list[dict[str, Any] | None] | None) -> list[inference_pb2.PromptLogprobs]:
    """vLLM's JSON shape (null, then {id: {logprob, rank, decoded_token}}) as protobuf."""
    return [
        inference_pb2.PromptLogprobs(
            candidates=[
                inference_pb2.PromptLogprobCandidate(
                    token_id=int(t), logprob=c["logprob"], rank=c["rank"], decoded_token=c["decoded_token"]
                )
                for t, c in (e or {}).items()
            ]
        )
        for e in entries or []
    ]


def _tool_call(t: dict[str, Any]) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        id=t["id"], type=t["type"], name=t["function"]["name"], arguments=t["function"]["arguments"]
    )


def chat_response(body: dict[str, Any]) -> inference_pb2.ChatCompletionResponse:
    choices = []
    for c in body["choices"]:
        m = c["message"]
        message = inference_pb2.AssistantMessage(
            role="assistant", tool_calls=[_tool_call(t) for t in m.get("tool_calls", [])]
        )
        if m["content"] is not None:
            message.content = m["content"]
        if m.get("reasoning_content"):
            message.reasoning_content = m["reasoning_content"]
        choices.append(
            inference_pb2.ChatChoice(
                index=c["index"],
                message=message,
                finish_reason=c["finish_reason"] or "",
                logprobs=_logprob_entries(c["logprobs"]),
            )
        )
    return inference_pb2.ChatCompletionResponse(
        id=body["id"],
        created=body["created"],
        model=body["model"],
        choices=choices,
        usage=_usage(body["usage"]),
        system_fingerprint=body["system_fingerprint"],
        prompt_logprobs=_prompt_logprobs(body.get("prompt_logprobs")),
    )


def chat_chunk(chunk: dict[str, Any]) -> inference_pb2.ChatCompletionChunk:
    choices = []
    for c in chunk["choices"]:
        d = c["delta"]
        choice = inference_pb2.ChatChunkChoice(
            index=c["index"],
            role=d.get("role", ""),
            finish_reason=c["finish_reason"] or "",
            logprobs=_logprob_entries(c["logprobs"]),
            tool_calls=[
                common_pb2.ToolCallDelta(
                    index=t["index"],
                    id=t.get("id", ""),
                    name=t.get("function", {}).get("name", ""),
                    arguments=t.get("function", {}).get("arguments", ""),
                )
                for t in d.get("tool_calls", [])
            ],
        )
        if d.get("content") is not None:
            choice.content = d["content"]
        if "reasoning_content" in d:
            choice.reasoning_content = d["reasoning_content"]
        choices.append(choice)
    return inference_pb2.ChatCompletionChunk(
        id=chunk["id"],
        created=chunk["created"],
        model=chunk["model"],
        choices=choices,
        usage=_usage(chunk.get("usage")),
        system_fingerprint=chunk["system_fingerprint"],
    )


def _completion_logprobs(lp: dict[str, Any] | None) -> inference_pb2.CompletionLogprobs | None:
    if lp is None:
        return None
    return inference_pb2.CompletionLogprobs(
        tokens=lp["tokens"],
        token_logprobs=[math.nan if v is None else v for v in lp["token_logprobs"]],
        text_offset=lp["text_offset"],
        top_logprobs=[inference_pb2.LogprobAlternatives(alternatives=t or {}) for t in lp["top_logprobs"]],
    )


def _completion_choices(body: dict[str, Any]) -> list[inference_pb2.CompletionChoice]:
    return [
        inference_pb2.CompletionChoice(
            index=c["index"],
            text=c["text"],
            finish_reason=c["finish_reason"] or "",
            logprobs=_completion_logprobs(c["logprobs"]),
            prompt_logprobs=_prompt_logprobs(c.get("prompt_logprobs")),
        )
        for c in body["choices"]
    ]


def completion_response(body: dict[str, Any]) -> inference_pb2.CompletionResponse:
    return inference_pb2.CompletionResponse(
        id=body["id"],
        created=body["created"],
        model=body["model"],
        choices=_completion_choices(body),
        usage=_usage(body["usage"]),
        system_fingerprint=body["system_fingerprint"],
    )


def completion_chunk(chunk: dict[str, Any]) -> inference_pb2.CompletionChunk:
    return inference_pb2.CompletionChunk(
        id=chunk["id"],
        created=chunk["created"],
        model=chunk["model"],
        choices=_completion_choices(chunk),
        usage=_usage(chunk.get("usage")),
        system_fingerprint=chunk["system_fingerprint"],
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    def _enter(self, context: grpc.aio.ServicerContext) -> ApiKey | None:
        """Authenticate (metadata `authorization: Bearer <key>`), rate-limit, and set the deadline."""
        ctx = self.ctx
        remaining = context.time_remaining()
        limit = ctx.config.request_timeout or None
        if remaining is not None and (limit is None or remaining < limit):
            limit = max(remaining, 1e-3)
        deadline.start(limit)
        if not ctx.keys.enabled:
            return None
        metadata = dict(context.invocation_metadata() or ())
        key = ctx.keys.authenticate(str(metadata.get("authorization", "")))
        ctx.rate_limiter.check(key)
        return key

    def _request_id(self) -> str:
        request_id = uuid.uuid4().hex
        request_id_var.set(request_id)
        return request_id

    async def _abort(self, context: grpc.aio.ServicerContext, err: Exception, method: str) -> None:
        """End the rpc with a status a client can act on; never a trace."""
        if not isinstance(err, APIError):
            log.exception("unhandled error in %s", method)
            err = APIError(500, "internal server error")
        self.ctx.metrics.count_request(f"grpc:{method}", err.status)
        await context.abort(_HTTP_TO_GRPC.get(err.status, grpc.StatusCode.INTERNAL), err.message)

    async def ChatCompletion(
        self, request: inference_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ChatCompletionResponse:
        try:
            key = self._enter(context)
            req = parse_chat(chat_body(request, False), self.ctx.limits)
            async with pipeline.chat(self.ctx, req, self._request_id(), key) as job:
                body = await job.collect()
        except Exception as err:
            await self._abort(context, err, "ChatCompletion")
            raise AssertionError("unreachable") from None
        self.ctx.metrics.count_request("grpc:ChatCompletion", 200, job.finish_reason())
        return chat_response(body)

    async def ChatCompletionStream(
        self, request: inference_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ChatCompletionChunk]:
        try:
            key = self._enter(context)
            req = parse_chat(chat_body(request, True), self.ctx.limits)
            async with pipeline.chat(self.ctx, req, self._request_id(), key) as job:
                async for chunk in job.chunks():
                    yield chat_chunk(chunk)
            self.ctx.metrics.count_request("grpc:ChatCompletionStream", 200, job.finish_reason())
        except Exception as err:
            await self._abort(context, err, "ChatCompletionStream")

    async def Completion(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CompletionResponse:
        try:
            key = self._enter(context)
            req = parse_completion(completion_body(request, False), self.ctx.limits)
            async with pipeline.completion(self.ctx, req, self._request_id(), key) as job:
                body = await job.collect()
        except Exception as err:
            await self._abort(context, err, "Completion")
            raise AssertionError("unreachable") from None
        self.ctx.metrics.count_request("grpc:Completion", 200, job.finish_reason())
        return completion_response(body)

    async def CompletionStream(
        self, request: inference_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.CompletionChunk]:
        try:
            key = self._enter(context)
            req = parse_completion(completion_body(request, True), self.ctx.limits)
            async with pipeline.completion(self.ctx, req, self._request_id(), key) as job:
                async for chunk in job.chunks():
                    yield completion_chunk(chunk)
            self.ctx.metrics.count_request("grpc:CompletionStream", 200, job.finish_reason())
        except Exception as err:
            await self._abort(context, err, "CompletionStream")

    async def Embed(
        self, request: inference_pb2.EmbedTextRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedTextResponse:
        try:
            key = self._enter(context)
            req = embeddings.parse_embeddings(embed_body(request), self.ctx.limits)
            result = await embeddings.embed(self.ctx, req, self._request_id(), key)
        except Exception as err:
            await self._abort(context, err, "Embed")
            raise AssertionError("unreachable") from None
        self.ctx.metrics.count_request("grpc:Embed", 200)
        return inference_pb2.EmbedTextResponse(
            model=result.model,
            data=[
                inference_pb2.EmbeddingVector(index=i, values=vector.tolist())
                for i, vector in enumerate(result.vectors)
            ],
            usage=inference_pb2.ResponseUsage(
                prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens
            ),
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        try:
            self._enter(context)
        except APIError as err:
            await self._abort(context, err, "ListModels")
        base = self.ctx.model_name
        # the base model, then each LoRA adapter a worker serves (its parent is the base)
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.Model(
                    id=name,
                    created=self.ctx.started_at,
                    owned_by="tandem",
                    max_model_len=self.ctx.max_model_len,
                    parent=parent,
                )
                for name, parent in [(base, ""), *((a, base) for a in sorted(self.ctx.router.adapters()))]
            ]
        )


async def start_grpc_server(app: web.Application, config: GatewayConfig) -> GrpcServer:
    """Serve the Inference API on host:--grpc-port with the HTTP app's context."""
    credentials = None
    if config.ssl_certfile:  # the same certificate as HTTPS (server-side TLS, clients use API keys)
        cert, key = Path(config.ssl_certfile).read_bytes(), Path(config.ssl_keyfile).read_bytes()
        credentials = grpc.ssl_server_credentials([(key, cert)])
    server = GrpcServer(
        f"{config.host}:{config.grpc_port}", grace_s=config.drain_timeout, server_credentials=credentials
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(app[CONTEXT]), server.server)
    server.add_service_name("tandem.v1.Inference")
    await server.start()
    return server
