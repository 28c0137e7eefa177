"""gRPC clients of the styler and the workers.

Every call converts protobuf to the dataclasses of `downstream.py` and back; gRPC errors
(`grpc.aio.AioRpcError`) propagate and `errors.py` maps them to HTTP statuses. The styler's
detokenize sessions, which all requests share one stream for, are in `detokenize_mux.py`; the
workers' Generate calls likewise share one stream per worker (`generate_mux.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.deadline import time_left
from gateway.detokenize_mux import DetokenizeMux, DetokenizeSession, MuxCounts
from gateway.downstream import (
    CacheEvent,
    ChoiceDelta,
    DetokenizeStart,
    EmbeddingResult,
    GenerateChunk,
    Guided,
    KVSource,
    PrefillResult,
    Rendered,
    StylerInfo,
    TokenLogprob,
    TokenText,
    ToolGrammarRequest,
    TopLogprob,
    Usage,
    WorkerInfo,
    WorkerLoad,
)
from gateway.generate_mux import GenerateMux, GenerateMuxCounts, GenerateSession
from gateway.grpc_errors import peer_gone, stream_removed
from services.common import switches, telemetry
from services.common.channels import make_channel
from services.common.sampling import SamplingParams
from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc, worker_pb2, worker_pb2_grpc

_FINISH = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}
_ROLES = {
    worker_pb2.WORKER_ROLE_UNSPECIFIED: "unified",
    worker_pb2.WORKER_ROLE_UNIFIED: "unified",
    worker_pb2.WORKER_ROLE_PREFILL: "prefill",
    worker_pb2.WORKER_ROLE_DECODE: "decode",
    worker_pb2.WORKER_ROLE_ENCODE: "encode",
}
_TASKS = {
    worker_pb2.WORKER_TASK_UNSPECIFIED: "generate",
    worker_pb2.WORKER_TASK_GENERATE: "generate",
    worker_pb2.WORKER_TASK_EMBED: "embed",
}
_EVENT_KINDS = {
    worker_pb2.KV_EVENT_KIND_STORED: "stored",
    worker_pb2.KV_EVENT_KIND_EVICTED: "evicted",
    worker_pb2.KV_EVENT_KIND_SNAPSHOT: "snapshot",
}

# Unary styler calls (render, tokenize, detokenize) get at most this long, deadline or not.
UNARY_TIMEOUT_S = 30.0

# Keys of an OpenAI chat message that map to ChatMessage fields; the rest go to extra_json.
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


async def check_health(channel: grpc.aio.Channel, timeout_s: float) -> bool | None:
    """Whether the standard gRPC health check of the server behind `channel` says SERVING; None
    when no answer came within `timeout_s` (a busy server on a loaded host, not a verdict)."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
    except asyncio.TimeoutError:
        return None
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _message_to_proto(message: dict[str, Any]) -> common_pb2.ChatMessage:
    out = common_pb2.ChatMessage(role=str(message["role"]))
    content = message.get("content")
    if isinstance(content, str):
        out.text = content
    elif isinstance(content, list):
        out.parts.SetInParent()
        for part in content:
            image = part.get("image_url") if part.get("type") == "image_url" else None
            out.parts.parts.append(
                common_pb2.ContentPart(
                    type=part.get("type", ""),
                    text=part.get("text", ""),
                    image_url=common_pb2.ImageUrl(url=image["url"], detail=image.get("detail") or "")
                    if image
                    else None,
                )
            )
    if message.get("name"):
        out.name = str(message["name"])
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments", "")
        out.tool_calls.append(
            common_pb2.ToolCall(
                id=str(call.get("id", "")),
                type=str(call.get("type", "function")),
                name=str(function.get("name", "")),
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
        )
    if message.get("tool_call_id"):
        out.tool_call_id = str(message["tool_call_id"])
    if message.get("reasoning_content") is not None:
        out.reasoning_content = str(message["reasoning_content"])
    extra = {k: v for k, v in message.items() if k not in _MESSAGE_KEYS}
    if extra:
        out.extra_json = json.dumps(extra)
    return out


def _logprob(entry: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top=tuple(TopLogprob(t.token_id, t.logprob) for t in entry.top_logprobs),
        rank=entry.rank,
    )


# SamplingParams.early_stopping (True / False / "never") on the wire; rpc.sampling_from_pb inverts it
EARLY_STOPPING_TO_PB: dict[bool | str, common_pb2.EarlyStopping] = {
    False: common_pb2.EARLY_STOPPING_FALSE,
    True: common_pb2.EARLY_STOPPING_TRUE,
    "never": common_pb2.EARLY_STOPPING_NEVER,
}


def _sampling_to_proto(s: SamplingParams[Guided]) -> common_pb2.SamplingParams:
    """The one conversion to the wire (the worker's `rpc.sampling_from_pb` is its inverse)."""
    out = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        min_tokens=s.min_tokens,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        n=s.n,
        logit_bias=dict(s.logit_bias),
        use_beam_search=s.use_beam_search,
        length_penalty=s.length_penalty,
        early_stopping=EARLY_STOPPING_TO_PB[s.early_stopping],
    )
    for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs", "best_of"):  # None: unset
        value = getattr(s, name)
        if value is not None:
            setattr(out, name, value)
    if s.guided is not None:
        out.guided.CopyFrom(_guided_to_proto(s.guided))
    return out


def _guided_to_proto(g: Guided) -> common_pb2.GuidedDecoding:
    if g.kind == "json_object":
        return common_pb2.GuidedDecoding(json_object=True)
    if g.kind == "choice":
        return common_pb2.GuidedDecoding(choice=common_pb2.StringList(values=list(g.choices)))
    out = common_pb2.GuidedDecoding()
    setattr(out, g.kind, g.value)  # json_schema | regex | lark_grammar: text
    return out


class StylerClient:
    """The styler's Styler service (one replica)."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = make_channel(address, credentials)
        self._stub = styler_pb2_grpc.StylerStub(self.channel)
        self._mux: DetokenizeMux | None = None  # every request's detokenize session, on one stream
        self.detokenize_counts = MuxCounts()

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
        await self.channel.close()

    async def healthy(self, timeout_s: float = 1.0) -> bool:
        return bool(await check_health(self.channel, timeout_s))

    async def info(self, timeout_s: float = 5.0) -> StylerInfo:
        r = await self._stub.Info(styler_pb2.StylerInfoRequest(), timeout=timeout_s)
        return StylerInfo(
            model_name=r.model_name,
            vocab_size=r.vocab_size,
            eos_token_ids=tuple(r.eos_token_ids),
            has_chat_template=r.has_chat_template,
            max_model_len=r.max_model_len,
            tool_parser=r.tool_parser,
            reasoning_parser=r.reasoning_parser,
            max_token_bytes=r.max_token_bytes,
        )

    async def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[Any] | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        documents: list[Any] | None = None,
        tool_grammar: ToolGrammarRequest | None = None,
    ) -> Rendered:
        req = styler_pb2.RenderRequest(
            messages=[_message_to_proto(m) for m in messages],
            tools_json=json.dumps(tools) if tools else "",
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
            documents_json=json.dumps(documents) if documents else "",
        )
        if chat_template is not None:
            req.chat_template = chat_template
        if tool_grammar is not None:
            req.tool_grammar.CopyFrom(
                styler_pb2.ToolGrammarOptions(
                    parallel_tool_calls=tool_grammar.parallel, answer_json_schema=tool_grammar.answer_schema
                )
            )
        r = await self._stub.Render(req, timeout=time_left(UNARY_TIMEOUT_S))
        return Rendered(
            prompt=r.prompt, token_ids=tuple(r.token_ids), images=tuple(r.images), tool_grammar=r.tool_grammar
        )

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
        r = await self._stub.Tokenize(
            styler_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            timeout=time_left(UNARY_TIMEOUT_S),
        )
        return tuple(r.token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        r = await self._stub.Detokenize(
            styler_pb2.DetokenizeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens),
            timeout=time_left(UNARY_TIMEOUT_S),
        )
        return str(r.text)

    async def token_texts(self, token_ids: Sequence[int]) -> list[TokenText]:
        """Each token's own text and bytes, special tokens included (for logprobs)."""
        r = await self._stub.Detokenize(
            styler_pb2.DetokenizeRequest(
                token_ids=list(token_ids), skip_special_tokens=False, return_token_bytes=True
            ),
            timeout=time_left(UNARY_TIMEOUT_S),
        )
        return [TokenText(text=b.decode("utf-8", errors="replace"), raw=bytes(b)) for b in r.token_bytes]

    async def detokenize_stream(self, start: DetokenizeStart) -> DetokenizeSession:
        """A detokenize session for one request, on this client's shared DetokenizeMany stream
        (opened now if there is none, or the last one ended or is past its age)."""
        left = time_left()  # 504 now if the request's deadline already passed
        if self._mux is None or not self._mux.takes_sessions():
            if self._mux is not None:
                self._mux.retire()
            self._mux = DetokenizeMux(self._stub, self.detokenize_counts)
        return self._mux.open(start, None if left is None else time.monotonic() + left)


class WorkerClient:
    """One worker's Worker service. Generate calls share one GenerateMany stream
    (generate_mux.py) unless `generate_mux` is False (default: TANDEM_GENERATE_MUX, and off while
    tracing, whose traces show one Generate rpc span per request with the engine's spans under it)."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        counts: GenerateMuxCounts | None = None,
        generate_mux: bool | None = None,
    ) -> None:
        self.address = address
        self.channel = make_channel(address, credentials)
        self._stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.generate_counts = counts if counts is not None else GenerateMuxCounts()
        self._use_mux = generate_mux
        self._mux: GenerateMux | None = None  # every request's Generate call, on one stream

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
        await self.channel.close()

    def uses_generate_mux(self) -> bool:
        if self._use_mux is None:
            self._use_mux = switches.GENERATE_MUX.value and not telemetry.tracing_enabled()
        return self._use_mux

    def _generate_session(self, message: worker_pb2.GenerateRequest) -> GenerateSession:
        """A session for `message` on this client's GenerateMany stream (opened now if there is
        none, or the last one ended or is past its age)."""
        left = time_left()  # 504 now if the request's deadline already passed
        if self._mux is None or not self._mux.takes_sessions():
            if self._mux is not None:
                self._mux.retire()
            self._mux = GenerateMux(self._stub, self.generate_counts)
        return self._mux.open(message, None if left is None else time.monotonic() + left)

    async def healthy(self, timeout_s: float = 1.0) -> bool | None:
        """SERVING or not; None when the check got no answer in time (gateway/router.py)."""
        return await check_health(self.channel, timeout_s)

    async def info(self, timeout_s: float = 5.0) -> WorkerInfo:
        r = await self._stub.Info(worker_pb2.InfoRequest(), timeout=timeout_s)
        return WorkerInfo(
            model_name=r.model_name,
            max_model_len=r.max_model_len,
            vocab_size=r.vocab_size,
            eos_token_ids=tuple(r.eos_token_ids),
            device=r.device,
            version=r.version,
            role=_ROLES.get(r.role, "unified"),
            architecture=r.architecture,
            dtype=r.dtype,
            block_size=r.block_size,
            kv_dtype=r.kv_layout.dtype,
            # the model's layout (what FetchKV moves), not one rank's: workers of different
            # parallel layouts pair (a worker too old to report it gives its rank's)
            kv_layout=(
                f"{r.kv_layout.model_num_layers or r.kv_layout.num_layers} layers x "
                f"{r.kv_layout.model_num_kv_heads or r.kv_layout.num_kv_heads} kv heads x "
                f"{r.kv_layout.head_dim}, block {r.kv_layout.block_size}, {r.kv_layout.layout}"
            ),
            tensor_parallel_size=r.tensor_parallel_size or 1,
            pipeline_parallel_size=r.pipeline_parallel_size or 1,
            kv_heads_per_rank=r.kv_layout.num_kv_heads,
            fingerprint=r.fingerprint,
            kv_events=r.kv_events,
            kv_layerwise=r.kv_layerwise,
            task=_TASKS.get(r.task, "generate"),
            hidden_size=r.hidden_size,
            encoder_cache_size=r.encoder_cache_size,
        )

    async def kv_events(self, after_sequence: int, epoch: str) -> AsyncIterator[CacheEvent]:
        """The worker's prefix-cache changes after `after_sequence` of `epoch` (a snapshot first
        when it cannot resume there), after a "subscribed" event once the worker has taken the
        subscription; runs until the stream breaks or the iterator is closed."""
        call = self._stub.SubscribeKvEvents(
            worker_pb2.SubscribeKvEventsRequest(after_sequence=after_sequence, epoch=epoch)
        )
        try:
            await call.initial_metadata()  # the worker took the subscription: it is up from here
            yield CacheEvent(after_sequence, "subscribed", (), 0, epoch)
            async for e in call:
                yield CacheEvent(
                    e.sequence, _EVENT_KINDS.get(e.kind, ""), tuple(e.block_hashes), e.block_size, e.epoch
                )
        finally:
            call.cancel()

    async def load(self, timeout_s: float = 1.0) -> WorkerLoad:
        r = await self._stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout_s)
        return WorkerLoad(
            num_running=r.num_running,
            num_waiting=r.num_waiting,
            num_kv_blocks_used=r.num_kv_blocks_used,
            num_kv_blocks_total=r.num_kv_blocks_total,
        )

    async def list_loras(self, timeout_s: float = 1.0) -> dict[str, str]:
        """The LoRA adapters the worker serves: name -> content digest."""
        r = await self._stub.ListLoRAs(worker_pb2.ListLoRAsRequest(), timeout=timeout_s)
        return {a.lora_name: a.digest for a in r.adapters}

    async def load_lora(self, lora_name: str, lora_path: str, timeout_s: float = 120.0) -> str:
        """LoadLoRA; returns the adapter's digest (raises the rpc's error)."""
        r = await self._stub.LoadLoRA(
            worker_pb2.LoadLoRARequest(lora_name=lora_name, lora_path=lora_path), timeout=timeout_s
        )
        return str(r.digest)

    async def unload_lora(self, lora_name: str, timeout_s: float = 10.0) -> None:
        await self._stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name=lora_name), timeout=timeout_s)

    async def abort(self, request_ids: Sequence[str], timeout_s: float = 1.0) -> int:
        r = await self._stub.Abort(worker_pb2.AbortRequest(request_ids=list(request_ids)), timeout=timeout_s)
        return int(r.num_aborted)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> PrefillResult:
        """Disaggregation: compute the prompt here, get the first token and the KV handle."""
        try:
            r = await self._stub.Prefill(
                _prefill_request(request_id, prompt_token_ids, sampling, first_choice_index, lora_name),
                timeout=time_left(),
            )
        except grpc.aio.AioRpcError as exc:
            raise _worker_gone(exc) from None
        return _prefill_result(r)

    async def prefill_stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> AsyncIterator[KVSource | PrefillResult]:
        """Disaggregation with layer-wise push: the KV handle as soon as the worker admitted the
        prompt, then the prefill's result. Closing the iterator early cancels the prefill."""
        call = self._stub.PrefillStream(
            _prefill_request(request_id, prompt_token_ids, sampling, first_choice_index, lora_name),
            timeout=time_left(),
        )
        try:
            async for event in call:
                if event.HasField("handle"):
                    yield _kv_source(event.handle)
                elif event.HasField("response"):
                    yield _prefill_result(event.response)
        except grpc.aio.AioRpcError as exc:
            raise _worker_gone(exc) from None
        finally:
            call.cancel()

    async def embed(self, request_id: str, inputs: Sequence[Sequence[int]]) -> list[EmbeddingResult]:
        """An embed worker's embeddings of `inputs` (token ids), in input order."""
        r = await self._stub.Embed(
            worker_pb2.EmbedRequest(
                request_id=request_id, inputs=[worker_pb2.EmbedInput(token_ids=list(ids)) for ids in inputs]
            ),
            timeout=time_left(),
        )
        return [
            EmbeddingResult(tuple(e.values), e.prompt_tokens, e.cached_prompt_tokens)
            for e in sorted(r.embeddings, key=lambda e: e.index)
        ]

    async def release_kv(self, handle_id: str, timeout_s: float = 1.0) -> bool:
        r = await self._stub.ReleaseKV(worker_pb2.ReleaseKVRequest(handle_id=handle_id), timeout=timeout_s)
        return bool(r.released)

    async def encode(
        self, request_id: str, images: Sequence[common_pb2.ImageInput], timeout_s: float | None = None
    ) -> tuple[common_pb2.ImageInput, ...]:
        """An encode worker's Encode: the images with their embeddings instead of their pixels."""
        request = worker_pb2.EncodeRequest(request_id=request_id, images=list(images))
        response = await self._stub.Encode(request, timeout=timeout_s)
        return tuple(response.images)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        generated_token_ids: Sequence[int] = (),
        kv_source: KVSource | None = None,
        group_id: str = "",
        images: Sequence[common_pb2.ImageInput] = (),
        lora_name: str = "",
    ) -> AsyncIterator[GenerateChunk]:
        """The worker's Generate stream; closing the iterator early cancels the rpc (= abort).
        `generated_token_ids` resumes a request (they are not streamed again); `kv_source` pulls
        the prompt's KV from a prefill worker instead of computing it."""
        message = worker_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=_sampling_to_proto(sampling),
            first_choice_index=first_choice_index,
            generated_token_ids=list(generated_token_ids),
            group_id=group_id,
            images=list(images),
            lora_name=lora_name,
        )
        if kv_source is not None:
            message.kv_source.CopyFrom(
                worker_pb2.KVHandle(
                    handle_id=kv_source.handle_id,
                    address=kv_source.address,
                    num_tokens=kv_source.num_tokens,
                    expires_at_ms=kv_source.expires_at_ms,
                    fingerprint=kv_source.fingerprint,
                    layerwise=kv_source.layerwise,
                )
            )
        # (a disaggregated decode leg keeps its own rpc: its KV fetch is per request anyway)
        if kv_source is None and self.uses_generate_mux():
            session = self._generate_session(message)
            try:
                async for r in session.responses():
                    yield r if isinstance(r, GenerateChunk) else _generate_chunk(r)
                return
            except grpc.aio.AioRpcError as exc:
                # A worker without GenerateMany (an older version): one rpc per request from now on.
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED or session.num_chunks:
                    raise
                self._use_mux = False
            finally:
                # Covers client disconnects (task cancelled) and early stops (stop strings): the
                # worker aborts a cancelled session's request.
                session.cancel()
        call = self._stub.Generate(
            message,
            # The client's deadline reaches the worker, which drops the request when it passes.
            timeout=time_left(),
        )
        try:
            async for r in call:
                yield _generate_chunk(r)
        except grpc.aio.AioRpcError as exc:
            raise _worker_gone(exc) from None
        finally:
            # Covers client disconnects (task cancelled) and early stops (stop strings): the worker
            # aborts a request whose stream is cancelled.
            call.cancel()


def _worker_gone(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """A worker rpc's failure as the router reads it: `exc`, or UNAVAILABLE where grpc reported
    the connection torn down under the rpc as UNKNOWN (grpc_errors.STREAM_REMOVED)."""
    return peer_gone(exc, "the connection to the worker broke") if stream_removed(exc) else exc


def hash_only_image(image: common_pb2.ImageInput, worker_hash: str) -> common_pb2.ImageInput:
    """`image` as its hash alone (no pixels, no rows), for a worker that holds it by `worker_hash`."""
    return common_pb2.ImageInput(
        hash=worker_hash, offset=image.offset, length=image.length, grid_thw=list(image.grid_thw)
    )


def _generate_chunk(r: worker_pb2.GenerateResponse) -> GenerateChunk:
    usage = None
    if r.HasField("usage"):
        usage = Usage(
            prompt_tokens=r.usage.prompt_tokens,
            completion_tokens=r.usage.completion_tokens,
            cached_prompt_tokens=r.usage.cached_prompt_tokens,
        )
    return GenerateChunk(
        choices=tuple(
            ChoiceDelta(
                index=c.index,
                token_ids=tuple(c.token_ids),
                logprobs=tuple(_logprob(e) for e in c.logprobs),
                finish_reason=_FINISH.get(c.finish_reason),
            )
            for c in r.choices
        ),
        prompt_logprobs=tuple(_logprob(e) for e in r.prompt_logprobs),
        usage=usage,
    )


def _prefill_request(
    request_id: str,
    prompt_token_ids: Sequence[int],
    sampling: SamplingParams[Guided],
    first_choice_index: int,
    lora_name: str,
) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling=_sampling_to_proto(sampling),
        first_choice_index=first_choice_index,
        lora_name=lora_name,
    )


def _kv_source(h: worker_pb2.KVHandle) -> KVSource:
    return KVSource(h.handle_id, h.address, h.num_tokens, h.expires_at_ms, h.fingerprint, h.layerwise)


def _prefill_result(r: worker_pb2.PrefillResponse) -> PrefillResult:
    handle = _kv_source(r.handle) if r.HasField("handle") and r.handle.handle_id else None
    return PrefillResult(
        first=ChoiceDelta(
            index=r.first.index,
            token_ids=tuple(r.first.token_ids),
            logprobs=tuple(_logprob(e) for e in r.first.logprobs),
            finish_reason=_FINISH.get(r.first.finish_reason),
        ),
        stop_token_id=r.first.stop_token_id if r.first.HasField("stop_token_id") else None,
        handle=handle,
        prompt_logprobs=tuple(_logprob(e) for e in r.prompt_logprobs),
        usage=Usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_prompt_tokens),
    )
