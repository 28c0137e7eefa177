"""The execution path every front end shares: prompt -> worker -> styler -> choice updates.

    prepare   chat: styler Render; completions: styler Tokenize (text) or the ids as given
    pick      router: least-loaded worker, preferring the one that served the same prefix
    generate  worker Generate (server stream of token-id deltas per choice)
       └─▶    styler detokenize session: token deltas in, text / reasoning / tool-call deltas out
              (on the stream all requests share, DetokenizeMany: detokenize_mux.py)
    yield     `ChoiceUpdate`s; when every choice is done the worker stream is cancelled (= abort)

Per prompt, a writer task pumps worker chunks into the styler session, and the session hands its
text deltas (its end, its failure) to the same queue as they arrive (`MuxSession.forward`); the
caller consumes that queue, so an error on either side ends the request at once, and cancelling
the caller (client disconnect) cancels the writer, the worker call and the styler session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.admission import Admission
from gateway.context import GatewayContext
from gateway.downstream import (
    DetokenizeStart,
    GenerateChunk,
    Guided,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolGrammarRequest,
)
from gateway.errors import APIError, invalid
from gateway.grpc_errors import from_grpc
from gateway.media import has_image_urls, inline_image_urls
from gateway.merge import merge_streams
from gateway.protocol import ChatRequest, CompletionRequest, GenerationParams
from gateway.styler_pool import NoStylerAvailable
from gateway.worker_stream import PromptStream
from services.common import telemetry
from services.common.reasoning import prompt_opens_reasoning
from services.common.sampling import SamplingError, SamplingParams, check_logit_bias, check_token_ids

log = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = "tandem-0.1.0"

# Styler calls one request makes at once while tokenizing its prompts (a long prompt list is
# fanned out this many at a time, not all at once).
TOKENIZE_CONCURRENCY = 8

# How long a request whose choices are all done waits for its worker and styler streams to end
# by themselves before cancelling them.
STREAM_END_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LogprobItem:
    """One position's logprob with token texts resolved (None logprob: the first prompt token)."""

    token: str
    raw: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...]
    # for vLLM's prompt_logprobs (keyed by token id): the ids of `token` and of `top`, the rank
    token_id: int = -1
    top_ids: tuple[int, ...] = ()
    rank: int = 0


@dataclass
class PromptRun:
    """One prompt of a request and what the worker said about it."""

    token_ids: tuple[int, ...]
    text: str | None  # the prompt text when known (chat render, text prompt, or detokenized for echo)
    opens_reasoning: bool = False
    first_choice_index: int = 0
    prompt_logprobs: tuple[LogprobItem, ...] = ()
    cached_tokens: int = 0
    completion_tokens: int = 0  # the final count, set when the prompt's generation ends
    generated_tokens: int = 0  # tokens received from the worker so far (continuous usage stats)
    images: tuple[Any, ...] = ()  # the styler's common_pb2.ImageInput (image-in models)
    tool_grammar: str = ""  # chat with strict tool calls: the grammar the output is decoded under


@dataclass(frozen=True)
class ChoiceUpdate:
    """New output of one choice."""

    index: int
    prompt: PromptRun
    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[LogprobItem, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "abort" | None
    matched_stop: str = ""  # the stop string that ended the choice (finish_reason "stop")
    # Token ids of the choice the styler took since the last update. An update may carry only
    # these, with no text: the styler holds their text back (an incomplete character, a parser's
    # undecided marker). The OpenAI streams send it as an empty chunk, as vLLM does, so clients
    # time tokens; the other APIs send nothing for it.
    num_new_tokens: int = 0


@dataclass
class RequestRun:
    """A whole request: its prompts, timing and usage."""

    request_id: str
    prompts: list[PromptRun]
    arrived: float = field(default_factory=time.monotonic)
    lora_name: str = ""  # the LoRA adapter the request's `model` selects ("" = the base model)
    first_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(p.completion_tokens for p in self.prompts)

    @property
    def completion_tokens_so_far(self) -> int:
        """Output tokens up to now: each prompt's final count once it is done, else what arrived."""
        return sum(p.completion_tokens or p.generated_tokens for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        return sum(p.cached_tokens for p in self.prompts)


@dataclass(frozen=True)
class DetokenizeOptions:
    skip_special_tokens: bool
    stop: tuple[str, ...]
    include_stop_str_in_output: bool
    tool_parser: str
    reasoning_parser: str


def _grpc_error(exc: grpc.aio.AioRpcError, service: str) -> APIError:
    return from_grpc(exc, service)


# The styler's Render errors start with the request field they blame ("messages[2]: ...").
_RENDER_FIELD = re.compile(
    r"(chat_template_kwargs|chat_template|continue_final_message|messages\[\d+\](?:\.content\[\d+\])?|messages"
    r"|tools(?:\[\d+\][\w.$]*)?|documents|response_format)(?=: )"
)


def _render_error(exc: grpc.aio.AioRpcError) -> APIError:
    error = from_grpc(exc, "styler")
    match = _RENDER_FIELD.match(error.message) if error.status == 400 else None
    if match is not None:
        error.param = match.group(1)
    return error


class Executor:
    def __init__(self, ctx: GatewayContext, chat: bool = True) -> None:
        self.ctx = ctx
        self._chat = chat  # names the field of a too-long prompt

    # ---- model and prompt preparation -------------------------------------------------------

    def check_model(self, model: str) -> str:
        """The model name a response reports: the served model, or the LoRA adapter `model` names
        (`lora_name`); OpenAI's 404 model_not_found for anything else."""
        served = self.ctx.model_name
        if model and model != served and model not in self.ctx.router.adapters():
            raise APIError(
                404,
                f"the model '{model}' does not exist (served: '{served}')",
                param="model",
                code="model_not_found",
            )
        return model if model and model != served else served

    def lora_name(self, model: str) -> str:
        """The LoRA adapter a checked `model` selects ("" for the base model)."""
        return "" if not model or model == self.ctx.model_name else model

    def check_num_sequences(self, num_prompts: int, n: int) -> int:
        """prompts x n (the sequences the workers schedule); 400 past --max-sequences-per-request."""
        cap = self.ctx.limits.max_sequences_per_request
        if num_prompts * n > cap:
            raise invalid(
                f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; at "
                f"most {cap} are allowed (--max-sequences-per-request)",
                "prompt" if num_prompts > 1 else "n",
            )
        return num_prompts * n

    def min_prompt_tokens(self, prompt: str | tuple[int, ...]) -> int:
        """The fewest tokens `prompt` can have, known without tokenizing it: a text of B bytes has
        at least B / (the most bytes a token stands for, from the styler's Info). 400 when that
        is already too long for the context or --max-prompt-tokens."""
        if not isinstance(prompt, str):
            fewest = len(prompt)
        else:
            info = self.ctx.stylers.info
            per_token = info.max_token_bytes if info is not None else 0
            num_bytes = len(prompt.encode("utf-8", "surrogatepass"))
            fewest = -(-num_bytes // per_token) if per_token else min(num_bytes, 1)
        limit = self.ctx.limits.max_prompt_tokens
        context = self.ctx.max_model_len
        if limit and fewest > limit:
            raise invalid(
                f"the prompt has at least {fewest} tokens; at most {limit} are allowed (--max-prompt-tokens)",
                "prompt",
            )
        if context and fewest >= context:
            raise invalid(
                f"this model's maximum context length is {context} tokens, and the prompt has at least "
                f"{fewest} tokens",
                "prompt",
            )
        return fewest

    async def render_chat(
        self, req: ChatRequest, tool_grammar: ToolGrammarRequest | None = None
    ) -> PromptRun:
        messages: Sequence[dict[str, Any]] = req.messages
        if has_image_urls(messages):  # http(s) image URLs of allowed hosts -> data: URLs
            messages = await inline_image_urls(messages, self.ctx.config.allowed_media_domains)
        try:
            rendered = await self.ctx.stylers.call(
                lambda c: c.render(
                    messages,
                    req.tools,
                    req.add_generation_prompt,
                    req.continue_final_message,
                    req.chat_template,
                    req.chat_template_kwargs,
                    req.documents,
                    tool_grammar,
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise _render_error(exc) from None
        except NoStylerAvailable as exc:
            raise APIError(503, str(exc), retry_after_s=1) from None
        opens = prompt_opens_reasoning(rendered.prompt)
        return PromptRun(
            token_ids=rendered.token_ids,
            text=rendered.prompt,
            opens_reasoning=opens,
            images=rendered.images,
            tool_grammar=rendered.tool_grammar,
        )

    async def tokenize_prompts(self, req: CompletionRequest) -> list[PromptRun]:
        slots = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

        async def one(prompt: str | tuple[int, ...]) -> PromptRun:
            if isinstance(prompt, str):
                async with slots:
                    ids = await self.ctx.stylers.call(lambda c: c.tokenize(prompt, req.add_special_tokens))
                return PromptRun(token_ids=ids, text=prompt)
            return PromptRun(token_ids=prompt, text=None)

        try:
            runs = list(await asyncio.gather(*(one(p) for p in req.prompts)))
            if req.echo:
                for run in runs:
                    if run.text is None:
                        run.text = await self.ctx.stylers.call(
                            lambda c, ids=run.token_ids: c.detokenize(ids, skip_special_tokens=False)  # type: ignore[misc]
                        )
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc, "styler") from None
        except NoStylerAvailable as exc:
            raise APIError(503, str(exc), retry_after_s=1) from None
        for i, run in enumerate(runs):
            run.first_choice_index = i * req.params.sampling.n
        return runs

    def sampling(
        self, params: GenerationParams, prompt_len: int, prompt_logprobs: int | None = None
    ) -> SamplingParams[Guided]:
        """The request's (validated) sampling parameters for one prompt: max_tokens resolved
        against the context and --max-tokens, the stop and logit_bias ids checked against the
        vocabulary."""
        max_model_len = self.ctx.max_model_len
        vocab = self.ctx.router.info().vocab_size if self.ctx.router.info() is not None else 0  # type: ignore[union-attr]
        if prompt_len == 0:
            raise invalid("the prompt is empty", "prompt")
        max_tokens = params.sampling.max_tokens
        limits = self.ctx.limits
        if limits.max_prompt_tokens and prompt_len > limits.max_prompt_tokens:
            raise invalid(
                f"the prompt has {prompt_len} tokens; at most {limits.max_prompt_tokens} are allowed "
                "(--max-prompt-tokens)",
                "messages" if self._chat else "prompt",
            )
        if max_model_len:
            if prompt_len >= max_model_len:
                raise invalid(
                    f"this model's maximum context length is {max_model_len} tokens, and the prompt has "
                    f"{prompt_len} tokens",
                    "messages" if self._chat else "prompt",
                )
            if max_tokens is None:
                max_tokens = max_model_len - prompt_len
            elif prompt_len + max_tokens > max_model_len:
                raise invalid(
                    f"this model's maximum context length is {max_model_len} tokens; you asked for "
                    f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the completion)",
                    "max_tokens",
                )
        if max_tokens is None and limits.max_tokens:
            max_tokens = limits.max_tokens  # the default, capped (it still fits: checked above)
            if max_model_len:
                max_tokens = min(max_tokens, max_model_len - prompt_len)
        try:
            check_token_ids("stop_token_ids", params.sampling.stop_token_ids, vocab)
            check_logit_bias(params.sampling.logit_bias, vocab)
        except SamplingError as exc:
            raise invalid(f"'{exc.field}' {exc.message}", exc.field) from None
        # the request's own prompt_logprobs (vLLM) and what echo with logprobs needs: the larger
        wanted = [k for k in (params.sampling.prompt_logprobs, prompt_logprobs) if k is not None]
        return dataclasses.replace(
            params.sampling, max_tokens=max_tokens, prompt_logprobs=max(wanted) if wanted else None
        )

    def check_token_ids(self, runs: Sequence[PromptRun]) -> None:
        info = self.ctx.router.info()
        if info is None or not info.vocab_size:
            return
        for run in runs:
            if any(t >= info.vocab_size for t in run.token_ids):
                raise invalid(
                    f"prompt token ids must be below the vocabulary size {info.vocab_size}", "prompt"
                )

    # ---- generation -------------------------------------------------------------------------

    async def generate(
        self,
        run: RequestRun,
        samplings: Sequence[SamplingParams[Guided]],
        detok: DetokenizeOptions,
        admission: Admission,
    ) -> AsyncIterator[ChoiceUpdate]:
        """All choices of all prompts of `run`, as they come (one task per prompt)."""
        streams = [
            self._generate_prompt(run, prompt, sampling, detok, admission)
            for prompt, sampling in zip(run.prompts, samplings, strict=True)
        ]
        async for update in merge_streams(streams):
            yield update

    async def _generate_prompt(
        self,
        run: RequestRun,
        prompt: PromptRun,
        sampling: SamplingParams[Guided],
        detok: DetokenizeOptions,
        admission: Admission,
    ) -> AsyncIterator[ChoiceUpdate]:
        ctx = self.ctx
        metrics = ctx.metrics
        n = sampling.n
        indices = range(prompt.first_choice_index, prompt.first_choice_index + n)
        worker_finish: dict[int, str] = {}
        worker_logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in indices}
        sent_tokens: dict[int, int] = dict.fromkeys(indices, 0)
        worker_usage: list[int] = []  # [completion_tokens, cached] from the final chunk
        events: asyncio.Queue[list[TextDelta] | BaseException | None] = asyncio.Queue()
        request_id = f"{run.request_id}-{len(run.prompts)}-{prompt.first_choice_index}-{uuid.uuid4().hex[:8]}"
        try:
            styler = ctx.stylers.pick()
            session = await styler.detokenize_stream(
                DetokenizeStart(
                    request_id=request_id,
                    prompt_token_ids=prompt.token_ids,
                    skip_special_tokens=detok.skip_special_tokens,
                    stop=detok.stop,
                    include_stop_str_in_output=detok.include_stop_str_in_output,
                    tool_parser=detok.tool_parser,
                    reasoning_parser=detok.reasoning_parser,
                    num_choices=n,
                    first_choice_index=prompt.first_choice_index,
                    prompt_opens_reasoning=prompt.opens_reasoning,
                )
            )
        except NoStylerAvailable as exc:
            raise APIError(503, str(exc), retry_after_s=1) from None
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc, "styler") from None

        async def on_chunk(chunk: GenerateChunk, last_chunk_at: list[float]) -> None:
            now = time.monotonic()
            num_new = sum(len(c.token_ids) for c in chunk.choices)
            if num_new:
                if run.first_token_at is None:
                    telemetry.event("first_token_from_worker")
                    run.first_token_at = now
                    metrics.ttft.observe(now - run.arrived)
                    admission.started()
                elif last_chunk_at:
                    metrics.itl.observe(now - last_chunk_at[0])
                last_chunk_at[:] = [now]
                metrics.generation_tokens.inc(num_new)
                prompt.generated_tokens += num_new
            if chunk.prompt_logprobs:
                prompt.prompt_logprobs = await self._prompt_logprob_items(prompt, chunk.prompt_logprobs)
            if chunk.usage is not None:
                worker_usage[:] = [chunk.usage.completion_tokens, chunk.usage.cached_prompt_tokens]
            deltas = []
            for c in chunk.choices:
                worker_logprobs.setdefault(c.index, []).extend(c.logprobs)
                sent_tokens[c.index] = sent_tokens.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    worker_finish[c.index] = c.finish_reason
                deltas.append((c.index, c.token_ids, c.finish_reason is not None))
            if deltas:
                await session.send(deltas)

        # Worker choice, disaggregation and resumption after a worker failure: worker_stream.py
        stream = PromptStream(
            ctx,
            request_id,
            prompt.token_ids,
            sampling,
            prompt.first_choice_index,
            run.request_id,
            prompt.images,
            run.lora_name,
        )

        async def write() -> None:
            try:
                last_chunk_at: list[float] = []
                async for chunk in stream.chunks():
                    await on_chunk(chunk, last_chunk_at)
                await session.done_writing()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                events.put_nowait(_grpc_error(exc, "styler"))
            except BaseException as exc:
                events.put_nowait(exc)

        # The styler's answers go straight into `events` as they arrive (no task of their own
        # woken per token); `styler_done` resolves when its session has ended.
        styler_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def from_styler(item: list[TextDelta] | grpc.aio.AioRpcError | None) -> None:
            if isinstance(item, list):
                events.put_nowait(item)
                return
            events.put_nowait(None if item is None else _grpc_error(item, "styler"))
            if not styler_done.done():
                styler_done.set_result(None)

        writer = asyncio.create_task(write())
        session.forward(from_styler)
        consumed: dict[int, int] = dict.fromkeys(indices, 0)
        done: set[int] = set()
        stopped_early = False  # a stop string ended a choice the worker was still generating
        try:
            while len(done) < n:
                item = await events.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                for d in item:
                    if d.index in done:
                        continue
                    logprobs: tuple[LogprobItem, ...] = ()
                    num_new_tokens = max(d.num_tokens - consumed.get(d.index, 0), 0)
                    if sampling.logprobs is not None and num_new_tokens:
                        entries = worker_logprobs.get(d.index, [])[consumed.get(d.index, 0) : d.num_tokens]
                        logprobs = await self._logprob_items(entries)
                    if d.num_tokens:
                        consumed[d.index] = max(consumed.get(d.index, 0), d.num_tokens)
                    finish = None
                    if d.finished or d.stopped:
                        done.add(d.index)
                        finish = "stop" if d.stopped else worker_finish.get(d.index, "stop")
                    if d.text or d.reasoning_text or d.tool_calls or logprobs or finish or num_new_tokens:
                        yield ChoiceUpdate(
                            index=d.index,
                            prompt=prompt,
                            text=d.text,
                            reasoning=d.reasoning_text,
                            tool_calls=d.tool_calls,
                            logprobs=logprobs,
                            finish_reason=finish,
                            matched_stop=d.matched_stop if d.stopped else "",
                            num_new_tokens=num_new_tokens,
                        )
            for i in indices:  # the styler closed without finishing a choice (should not happen)
                if i not in done:
                    yield ChoiceUpdate(index=i, prompt=prompt, finish_reason=worker_finish.get(i, "stop"))
            # Every choice is done: let the streams end on their own rather than cancel them.
            # grpcio leaks the native op array of a read in flight when its call is cancelled, on
            # both ends (grpc/grpc#43360): a slow leak per request otherwise.
            if all(i in worker_finish for i in indices):
                # The worker closes its stream, the writer then half-closes the styler's, and
                # the styler ends it.
                await asyncio.wait([writer, styler_done], timeout=STREAM_END_TIMEOUT_S)
            else:
                stopped_early = True
                if await stream.abort():
                    # A stop string ended them: the worker aborts the request and ends its
                    # stream, then the writer half-closes the styler's as above.
                    await asyncio.wait([writer, styler_done], timeout=STREAM_END_TIMEOUT_S)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            session.cancel()
            stopped_early = stopped_early or any(worker_finish.get(i) is None for i in indices)
            if worker_usage and not stopped_early:
                prompt.completion_tokens = worker_usage[0]
            else:
                prompt.completion_tokens = sum(max(consumed[i], 0) or sent_tokens.get(i, 0) for i in indices)
            if worker_usage:
                prompt.cached_tokens = worker_usage[1]

    async def _logprob_items(self, entries: Sequence[TokenLogprob]) -> tuple[LogprobItem, ...]:
        ids = [e.token_id for e in entries] + [t.token_id for e in entries for t in e.top]
        texts = await self.ctx.token_texts.get(ids)
        by_id = dict(zip(ids, texts, strict=True))
        return tuple(
            LogprobItem(
                token=by_id[e.token_id].text,
                raw=by_id[e.token_id].raw,
                logprob=e.logprob,
                top=tuple((by_id[t.token_id].text, by_id[t.token_id].raw, t.logprob) for t in e.top),
                token_id=e.token_id,
                top_ids=tuple(t.token_id for t in e.top),
                rank=e.rank,
            )
            for e in entries
        )

    async def _prompt_logprob_items(
        self, prompt: PromptRun, entries: Sequence[TokenLogprob]
    ) -> tuple[LogprobItem, ...]:
        """Logprobs of every prompt token; the first position has none (the worker skips it)."""
        items = list(await self._logprob_items(entries))
        missing = len(prompt.token_ids) - len(items)
        if missing > 0:
            heads = await self.ctx.token_texts.get(prompt.token_ids[:missing])
            items = [
                LogprobItem(h.text, h.raw, None, (), token_id=t)
                for h, t in zip(heads, prompt.token_ids[:missing], strict=True)
            ] + items
        return tuple(items)
