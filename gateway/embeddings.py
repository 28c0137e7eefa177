"""OpenAI embeddings (`POST /v1/embeddings`, the Inference API's `Embed`) from workers in pooling
mode (`tandem worker --task embed`).

    parse     body -> EmbeddingRequest: `input` as a string, strings, token ids or token-id lists
    tokenize  texts through the styler's tokenizer (special tokens added, no chat template)
    embed     one worker Embed call with every input; the worker batches them with other requests
    respond   `dimensions`: the first values, renormalised (Matryoshka); floats or base64 of
              little-endian float32 (what OpenAI's SDK decodes)

The worker returns each input's final-norm hidden state at its last token, L2-normalised.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from gateway.auth import ApiKey
from gateway.clients import WorkerClient
from gateway.context import GatewayContext
from gateway.downstream import EmbeddingResult
from gateway.errors import APIError, invalid
from gateway.execution import TOKENIZE_CONCURRENCY, Executor
from gateway.grpc_errors import from_grpc
from gateway.limits import Limits
from gateway.router import NoWorkerAvailable, NoWorkerForTask, WorkerState
from gateway.styler_pool import NoStylerAvailable
from gateway.validation import Fields, text_or_token_ids

ENCODING_FORMATS = ("float", "base64")
# A worker that goes away mid-call (UNAVAILABLE) or is full: the inputs go to another worker, at most
# this many attempts in all.
MAX_ATTEMPTS = 2

Input = str | tuple[int, ...]


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[Input, ...]  # texts or token ids, at least one, none empty
    dimensions: int | None  # Matryoshka truncation; None: the whole embedding
    encoding_format: str  # "float" | "base64"
    user: str


def _inputs(value: Any, max_inputs: int) -> tuple[Input, ...]:
    """OpenAI's four input forms: a string, a list of strings, token ids, a list of token-id lists."""
    inputs = text_or_token_ids(value)
    if inputs is None:
        raise invalid(
            "'input' must be a string, a list of strings, a list of token ids or a list of token-id lists "
            "(non-empty)",
            "input",
        )
    if any(i == "" for i in inputs):
        raise invalid("'input' must not be empty (an empty string)", "input")
    if len(inputs) > max_inputs:
        raise invalid(
            f"'input' has {len(inputs)} items; at most {max_inputs} are allowed (--max-sequences-per-request)",
            "input",
        )
    return inputs


def parse_embeddings(body: dict[str, Any], limits: Limits) -> EmbeddingRequest:
    f = Fields(body)
    model = f.string("model", "") or ""
    if "input" not in body:
        raise invalid("'input' is required", "input")
    inputs = _inputs(f.raw("input"), limits.max_sequences_per_request)
    dimensions = f.integer("dimensions", lo=1)
    encoding_format = f.string("encoding_format", "float") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got {encoding_format!r}",
            "encoding_format",
        )
    user = f.string("user", "") or ""
    f.reject_rest()
    return EmbeddingRequest(model, inputs, dimensions, encoding_format, user)


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    if dimensions is not None and hidden_size and dimensions > hidden_size:
        raise invalid(
            f"'dimensions' is {dimensions}, more than this model's {hidden_size}-dimensional embeddings",
            "dimensions",
        )


def truncate(values: Sequence[float], dimensions: int | None) -> np.ndarray:
    """The first `dimensions` values, renormalised (vLLM's and OpenAI's Matryoshka truncation), as
    float32; the whole (already normalised) embedding without `dimensions`."""
    vector = np.asarray(values, dtype=np.float32)
    if dimensions is None or dimensions >= vector.shape[0]:
        return vector
    head = vector[:dimensions].astype(np.float64)
    norm = float(np.linalg.norm(head))
    return (head / norm if norm > 0 else head).astype(np.float32)


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]


@dataclass(frozen=True)
class Embeddings:
    """An answered request: the vectors (truncated, normalised) and the tokens they took."""

    model: str
    vectors: list[np.ndarray]
    prompt_tokens: int

    def response(self, encoding_format: str) -> dict[str, Any]:
        """The OpenAI CreateEmbeddingResponse."""
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v, encoding_format)}
                for i, v in enumerate(self.vectors)
            ],
            "model": self.model,
            "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens},
        }


def _check_embed_workers(ctx: GatewayContext) -> None:
    """400 naming `model` when the workers that answered all serve text generation."""
    tasks = ctx.router.tasks()
    if tasks and "embed" not in tasks:
        raise invalid(
            f"the model '{ctx.model_name}' does not serve embeddings: this gateway's workers run "
            "--task generate; /v1/embeddings needs workers started with --task embed",
            "model",
        )


async def _tokenize(ctx: GatewayContext, inputs: Sequence[Input]) -> list[tuple[int, ...]]:
    slots = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def one(item: Input) -> tuple[int, ...]:
        if not isinstance(item, str):
            return item
        async with slots:
            return await ctx.stylers.call(lambda c: c.tokenize(item, add_special_tokens=True))

    try:
        return list(await asyncio.gather(*(one(i) for i in inputs)))
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc, "styler") from None
    except NoStylerAvailable as exc:
        raise APIError(503, str(exc), retry_after_s=1) from None


def _check_tokens(ctx: GatewayContext, token_ids: Sequence[tuple[int, ...]]) -> None:
    """400 naming `input` for an input without tokens, past the context or --max-prompt-tokens,
    or with an id outside the vocabulary."""
    info = ctx.router.task_info("embed")
    context = info.max_model_len if info is not None else ctx.max_model_len
    vocab = info.vocab_size if info is not None else 0
    limit = ctx.limits.max_prompt_tokens
    for i, ids in enumerate(token_ids):
        where = f"input[{i}]" if len(token_ids) > 1 else "the input"
        if not ids:
            raise invalid(f"{where} has no tokens", "input")
        if limit and len(ids) > limit:
            raise invalid(
                f"{where} has {len(ids)} tokens; at most {limit} are allowed (--max-prompt-tokens)", "input"
            )
        if context and len(ids) > context:
            raise invalid(
                f"this model's maximum context length is {context} tokens, and {where} has {len(ids)} tokens",
                "input",
            )
        if vocab and any(t >= vocab for t in ids):
            raise invalid(f"{where}: token ids must be below the vocabulary size {vocab}", "input")


async def _call_workers(
    ctx: GatewayContext, request_id: str, token_ids: list[tuple[int, ...]]
) -> list[EmbeddingResult]:
    """One Embed call with every input, moved to another worker when one is gone or full."""
    tried: list[WorkerState] = []
    full = False
    while True:
        try:
            worker = ctx.router.pick(token_ids[0], exclude=tried, task="embed")
        except NoWorkerForTask as exc:
            raise invalid(str(exc), "model") from None
        except NoWorkerAvailable:
            if full:
                raise APIError(
                    429, "every worker is at capacity; retry shortly", code="overloaded", retry_after_s=1
                ) from None
            raise APIError(503, "no embedding worker (--task embed) is available", retry_after_s=1) from None
        client = worker.client
        if not isinstance(client, WorkerClient):  # OpenEngine / SMG engines: no pooling rpc here
            raise invalid("this gateway's workers serve no embeddings (their protocol has no Embed)", "model")
        ctx.metrics.worker_requests.labels(worker=ctx.label(worker.name, worker.address)).inc()
        try:
            with ctx.router.track(worker):
                return await client.embed(
                    request_id if not tried else f"{request_id}.{len(tried) + 1}", token_ids
                )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            if code == grpc.StatusCode.UNAVAILABLE:
                ctx.router.mark_failed(worker)
            full = full or code == grpc.StatusCode.RESOURCE_EXHAUSTED
            tried.append(worker)
            if not retry or len(tried) >= MAX_ATTEMPTS:
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise APIError(
                        429, "every worker is at capacity; retry shortly", code="overloaded", retry_after_s=1
                    ) from None
                raise from_grpc(exc, "worker") from None


async def embed(
    ctx: GatewayContext, req: EmbeddingRequest, request_id: str, api_key: ApiKey | None = None
) -> Embeddings:
    """Validate against the served model, tokenize, embed, truncate. Shared by both front ends."""
    executor = Executor(ctx, chat=False)
    model = executor.check_model(req.model)
    _check_embed_workers(ctx)
    info = ctx.router.task_info("embed")
    check_dimensions(req.dimensions, info.hidden_size if info is not None else 0)
    async with ctx.gate.admit(len(req.inputs), min_tokens=len(req.inputs)) as admission:
        token_ids = await _tokenize(ctx, req.inputs)
        _check_tokens(ctx, token_ids)
        num_tokens = sum(len(ids) for ids in token_ids)
        admission.add_tokens(num_tokens)
        ctx.metrics.prompt_tokens.inc(num_tokens)
        results = await _call_workers(ctx, request_id or uuid.uuid4().hex, token_ids)
        admission.started()
    ctx.rate_limiter.add_tokens(api_key, num_tokens)
    check_dimensions(req.dimensions, len(results[0].values))  # (a worker whose Info came late)
    vectors = [truncate(r.values, req.dimensions) for r in results]
    return Embeddings(model, vectors, num_tokens)
