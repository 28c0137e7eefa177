"""A chat or completion request from validated input to a stream of OpenAI chunks.

Both front ends (HTTP routes, gRPC Inference) call `chat` / `completion` here, so admission,
prompt preparation, sampling defaults, metrics and response shapes are the same for both.

    async with pipeline.chat(ctx, req, request_id) as job:
        async for chunk in job.chunks():      # stream
            ...
        body = await job.collect()            # or the whole response
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from gateway.auth import ApiKey
from gateway.context import GatewayContext
from gateway.downstream import Guided
from gateway.execution import ChoiceUpdate, DetokenizeOptions, Executor, RequestRun
from gateway.protocol import ChatRequest, CompletionRequest
from gateway.responses import ChatResult, CompletionResult, usage
from gateway.strict_tools import strict_tool_grammar
from services.common import telemetry

log = logging.getLogger(__name__)


@dataclass
class Job:
    run: RequestRun
    result: ChatResult | CompletionResult
    updates: AsyncIterator[ChoiceUpdate]
    include_usage: bool
    continuous_usage: bool = False

    async def chunk_batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """OpenAI stream chunks (the usage chunk last when asked; with continuous usage stats, as
        vLLM does, every chunk carries the usage up to it), those one update makes (a chat's
        role chunk and its first text) in one list: an SSE stream writes each list at once."""
        first = True
        async for update in self.updates:
            chunks = self.result.add(update)
            if self.continuous_usage:
                for chunk in chunks:
                    chunk["usage"] = usage(self.run, so_far=True)
            if chunks:
                if first:
                    telemetry.event("first_chunk")
                    first = False
                yield chunks
        if self.include_usage:
            yield [self.result.usage_chunk(self.run)]

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """The chunks of `chunk_batches`, one by one."""
        async for batch in self.chunk_batches():
            for chunk in batch:
                yield chunk

    async def collect(self) -> dict[str, Any]:
        """The whole OpenAI response."""
        async for update in self.updates:
            self.result.add(update)
        return self.result.response(self.run)

    def finish_reason(self) -> str:
        """The finish reason for metrics (the first choice's; requests rarely mix them)."""
        reasons = self.result.finish_reasons()
        return reasons[0] if reasons else ""


def _record(ctx: GatewayContext, run: RequestRun) -> None:
    ctx.metrics.prompt_tokens.inc(run.prompt_tokens)


def _finish(ctx: GatewayContext, job: Job | None, run: RequestRun, api_key: ApiKey | None) -> None:
    """Charge the key's token rate limit; log prompt and output only with --log-requests."""
    ctx.rate_limiter.add_tokens(api_key, run.prompt_tokens + run.completion_tokens)
    if ctx.config.log_requests:
        outputs = ["".join(c.text) for c in job.result.choices] if job is not None else []
        prompts = [p.text if p.text is not None else list(p.token_ids) for p in run.prompts]
        log.info("request %s prompt=%r output=%r", run.request_id, prompts, outputs)


@asynccontextmanager
async def chat(
    ctx: GatewayContext, req: ChatRequest, request_id: str, api_key: ApiKey | None = None
) -> AsyncIterator[Job]:
    executor = Executor(ctx, chat=True)
    model = executor.check_model(req.model)
    # (best_of / beam search: the worker runs num_sequences of which n are returned)
    executor.check_num_sequences(1, req.params.sampling.num_sequences)
    # Admission before rendering: a full queue refuses at once (the prompt has at least a token).
    async with ctx.gate.admit(req.params.sampling.num_sequences, min_tokens=1) as admission:
        prompt = await executor.render_chat(req, strict_tool_grammar(req, ctx.config.strict_tools))
        sampling = executor.sampling(req.params, len(prompt.token_ids))
        if prompt.tool_grammar:  # strict tool calls: the grammar takes in response_format's schema
            guided = Guided("lark_grammar", prompt.tool_grammar, param="tools")
            sampling = dataclasses.replace(sampling, guided=guided)
        admission.add_tokens(len(prompt.token_ids))
        run = RequestRun(request_id, [prompt], lora_name=executor.lora_name(model))
        _record(ctx, run)
        info = ctx.stylers.info
        use_tools = (
            bool(req.tools) and req.tool_choice == "auto" and info is not None and bool(info.tool_parser)
        )
        # Guided output is the constrained text from its first token: there is no reasoning to
        # split off (a parser would take a prompt-opened `<think>` as reasoning to the end).
        use_reasoning = (
            info is not None and bool(info.reasoning_parser) and req.params.sampling.guided is None
        )
        detok = DetokenizeOptions(
            skip_special_tokens=req.params.skip_special_tokens,
            stop=req.params.stop,
            include_stop_str_in_output=req.params.include_stop_str_in_output,
            tool_parser="auto" if use_tools else "",
            reasoning_parser="auto" if use_reasoning else "",
        )
        result = ChatResult(
            request_id,
            model,
            int(time.time()),
            req.params.sampling.n,
            logprobs=req.params.sampling.logprobs is not None,
            parallel_tool_calls=req.parallel_tool_calls,
            include_usage=req.params.include_usage,
            forced=req.forced_tool,
            prompt_logprobs=req.params.sampling.prompt_logprobs,
        )
        updates = executor.generate(run, [sampling], detok, admission)
        job = Job(run, result, updates, req.params.include_usage, req.params.continuous_usage)
        try:
            yield job
        finally:
            await updates.aclose()  # type: ignore[attr-defined]
            _finish(ctx, job, run, api_key)


@asynccontextmanager
async def completion(
    ctx: GatewayContext, req: CompletionRequest, request_id: str, api_key: ApiKey | None = None
) -> AsyncIterator[Job]:
    executor = Executor(ctx, chat=False)
    model = executor.check_model(req.model)
    num_sequences = executor.check_num_sequences(len(req.prompts), req.params.sampling.num_sequences)
    # What needs no tokens is refused before tokenizing: too many sequences, a prompt too long
    # by its bytes alone, a token queue that its fewest possible tokens overflow.
    min_tokens = sum(executor.min_prompt_tokens(p) for p in req.prompts)
    async with ctx.gate.admit(num_sequences, min_tokens) as admission:
        prompts = await executor.tokenize_prompts(req)
        executor.check_token_ids(prompts)
        want_prompt_logprobs = req.echo and req.params.sampling.logprobs is not None
        samplings = [
            executor.sampling(
                req.params,
                len(p.token_ids),
                prompt_logprobs=req.params.sampling.logprobs if want_prompt_logprobs else None,
            )
            for p in prompts
        ]
        admission.add_tokens(sum(len(p.token_ids) for p in prompts))
        run = RequestRun(request_id, prompts, lora_name=executor.lora_name(model))
        _record(ctx, run)
        detok = DetokenizeOptions(
            skip_special_tokens=req.params.skip_special_tokens,
            stop=req.params.stop,
            include_stop_str_in_output=req.params.include_stop_str_in_output,
            tool_parser="",
            reasoning_parser="",
        )
        result = CompletionResult(
            request_id,
            model,
            int(time.time()),
            req.params.sampling.n * len(prompts),
            logprobs=req.params.sampling.logprobs,
            echo=req.echo,
            include_usage=req.params.include_usage,
            prompt_logprobs=req.params.sampling.prompt_logprobs,
        )
        updates = executor.generate(run, samplings, detok, admission)
        job = Job(run, result, updates, req.params.include_usage, req.params.continuous_usage)
        try:
            yield job
        finally:
            await updates.aclose()  # type: ignore[attr-defined]
            _finish(ctx, job, run, api_key)
