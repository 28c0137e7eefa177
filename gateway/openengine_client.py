"""A worker reached over OpenEngine (`--worker openengine:HOST:PORT`): any engine that serves
`openengine.v1.Inference` / `Control` (a tandem worker, or another engine's OpenEngine server)
behind tandem's gateway and styler.

`OpenEngineWorkerClient` presents the interface of `clients.WorkerClient` (the router and the
execution code cannot tell them apart) and converts to and from OpenEngine's messages; it is the
only gateway module that imports `openengine.v1`. What OpenEngine cannot carry (tandem's
disaggregation hand-off: `prefill`, `kv_source`; resuming a request of several choices) is refused
with UNIMPLEMENTED, which the gateway answers like any worker refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gateway.clients import check_health
from gateway.deadline import time_left
from gateway.downstream import (
    CacheEvent,
    ChoiceDelta,
    GenerateChunk,
    Guided,
    KVSource,
    PrefillResult,
    TokenLogprob,
    TopLogprob,
    Usage,
    WorkerInfo,
    WorkerLoad,
)
from openengine.v1 import (
    generation_pb2,
    kv_pb2,
    lifecycle_pb2,
    model_pb2,
    openengine_pb2_grpc,
    server_pb2,
)
from services.common.channels import make_channel
from services.common.sampling import SamplingParams, resumed

PREFIX = "openengine:"
_FINISH = {
    generation_pb2.FINISH_REASON_UNSPECIFIED: "stop",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CANCELLED: "abort",
}
_ROLES = {
    server_pb2.ENGINE_ROLE_UNSPECIFIED: "unified",
    server_pb2.ENGINE_ROLE_AGGREGATED: "unified",
    server_pb2.ENGINE_ROLE_PREFILL: "prefill",
    server_pb2.ENGINE_ROLE_DECODE: "decode",
}
# tandem's guided kinds -> OpenEngine's guides (tandem's grammars are llguidance Lark)
_GUIDES = {"json_schema": "json_schema", "regex": "regex", "lark_grammar": "ebnf_grammar"}


def unimplemented(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )


def sampling_to_openengine(s: SamplingParams[Guided], msg: generation_pb2.GenerateRequest) -> None:
    """The gateway's SamplingParams[Guided] into `msg`'s sampling, stopping, response and guided options."""
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        value = getattr(s, name)
        if value is not None:
            setattr(msg.sampling, name, value)
    if s.top_k is not None:
        msg.sampling.top_k = s.top_k
    if s.seed is not None:
        msg.sampling.seed = s.seed
    msg.sampling.num_sequences = s.n
    if s.max_tokens is not None:
        msg.stopping.max_tokens = s.max_tokens
    if s.min_tokens:
        msg.stopping.min_tokens = s.min_tokens
    if s.ignore_eos:
        msg.stopping.ignore_eos = True
    msg.stopping.conditions.extend(generation_pb2.StopCondition(stop_token_id=t) for t in s.stop_token_ids)
    if s.logprobs is not None:
        msg.response.return_output_logprobs = True
        msg.response.output_candidates.top_n = s.logprobs
    if s.prompt_logprobs is not None:
        msg.response.return_prompt_logprobs = True
        msg.response.prompt_candidates.top_n = s.prompt_logprobs
    if s.guided is not None:
        _guided(s.guided, msg.guided)
    if s.logit_bias:
        raise unimplemented("logit_bias: OpenEngine's proto has no logit bias")


def _guided(g: Guided, out: generation_pb2.GuidedDecoding) -> None:
    if g.kind == "json_object":
        out.json_object.SetInParent()
    elif g.kind == "choice":
        out.choice.choices.extend(g.choices)
    else:
        setattr(out, _GUIDES[g.kind], g.value)


def _logprob(t: generation_pb2.TokenInfo) -> TokenLogprob:
    return TokenLogprob(t.token_id, t.logprob, tuple(TopLogprob(c.token_id, c.logprob) for c in t.candidates))


def _hashes(hashes: Sequence[kv_pb2.KvBlockHash]) -> tuple[int, ...]:
    return tuple(
        int.from_bytes(h.value, "big") for h in hashes if h.encoding == "int64" and len(h.value) == 8
    )


def _cache_events(batch: kv_pb2.KvEventBatch) -> list[CacheEvent]:
    """A batch as cache events, in order; "cleared" starts a snapshot that the blocks stored after
    it in the same batch complete (how a snapshot arrives)."""
    seq, out = batch.sequence_number, []
    for e in batch.events:
        kind = e.WhichOneof("event")
        if kind == "all_blocks_cleared":
            out.append(CacheEvent(seq, "snapshot", (), 0, ""))
        elif kind == "block_stored":
            stored, size = _hashes(e.block_stored.block_hashes), e.block_stored.block_size
            if out and out[-1].kind == "snapshot":
                last = out.pop()
                out.append(CacheEvent(seq, "snapshot", last.block_hashes + stored, size, ""))
            else:
                out.append(CacheEvent(seq, "stored", stored, size, ""))
        elif kind == "block_removed":
            out.append(CacheEvent(seq, "evicted", _hashes(e.block_removed.block_hashes), 0, ""))
    return out


class OpenEngineWorkerClient:
    """One engine's OpenEngine services, with `clients.WorkerClient`'s interface."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address  # as configured, with its `openengine:` prefix
        self.channel = make_channel(address.removeprefix(PREFIX), credentials)
        self._inference = openengine_pb2_grpc.InferenceStub(self.channel)
        self._control = openengine_pb2_grpc.ControlStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def healthy(self, timeout_s: float = 1.0) -> bool | None:
        """OpenEngine's Health says READY (or the standard gRPC health check, for engines whose
        Health rpc is missing); None when it got no answer in time."""
        try:
            r = await self._control.Health(lifecycle_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return await check_health(self.channel, timeout_s)
            return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        except TimeoutError:
            return None
        return bool(r.state == lifecycle_pb2.HEALTH_STATE_READY)

    async def info(self, timeout_s: float = 5.0) -> WorkerInfo:
        server = await self._control.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=timeout_s)
        model = await self._control.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=timeout_s)
        return WorkerInfo(
            model_name=model.served_model_name or model.model_id,
            max_model_len=model.max_context_length,
            vocab_size=0,  # OpenEngine does not report it: the gateway skips its vocabulary check
            eos_token_ids=(),
            device="",
            version=f"{server.engine_name} {server.engine_version}".strip(),
            role=_ROLES.get(server.engine_role, "unified"),
            block_size=server.capacity.kv_block_size,
            tensor_parallel_size=server.parallelism.tensor_parallel_size or 1,
            # Tried: an engine without them answers SubscribeKvEvents UNIMPLEMENTED, and the
            # router's follower then leaves it to affinity.
            kv_events=True,
        )

    async def kv_events(self, after_sequence: int, epoch: str) -> AsyncIterator[CacheEvent]:
        """OpenEngine's KV event stream as tandem's cache events. OpenEngine has no epoch to resume
        in, so every subscription starts with a snapshot. Hashes in its "int64" encoding are read
        as tandem's (8 bytes big-endian): a tandem worker's match the router's; another engine's
        hash differently and simply never match (the router then goes by affinity and load)."""
        call = self._control.SubscribeKvEvents(kv_pb2.SubscribeKvEventsRequest(include_snapshot=True))
        try:
            await call.initial_metadata()
            yield CacheEvent(after_sequence, "subscribed", (), 0, epoch)
            async for reply in call:
                if reply.WhichOneof("event") != "batch":  # a terminal EngineError
                    return
                for event in _cache_events(reply.batch):
                    yield event
        finally:
            call.cancel()

    async def load(self, timeout_s: float = 1.0) -> WorkerLoad:
        r = await self._control.GetLoad(server_pb2.GetLoadRequest(), timeout=timeout_s)
        return WorkerLoad(
            num_running=r.running_requests,
            num_waiting=r.queued_requests,
            num_kv_blocks_used=r.used_kv_blocks,
            num_kv_blocks_total=r.total_kv_blocks,
        )

    async def abort(self, request_ids: Sequence[str], timeout_s: float = 1.0) -> int:
        num = 0
        for rid in request_ids:
            r = await self._control.Abort(lifecycle_pb2.AbortRequest(request_id=rid), timeout=timeout_s)
            num += r.status == lifecycle_pb2.ABORT_STATUS_ABORTED
        return num

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> PrefillResult:
        raise unimplemented(
            "disaggregated prefill goes through tandem's proto (--prefill-worker), not OpenEngine"
        )

    async def prefill_stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> AsyncIterator[KVSource | PrefillResult]:
        raise unimplemented(
            "disaggregated prefill goes through tandem's proto (--prefill-worker), not OpenEngine"
        )
        yield  # (an async generator, as WorkerClient.prefill_stream)

    async def release_kv(self, handle_id: str, timeout_s: float = 1.0) -> bool:
        raise unimplemented("KV handles go through tandem's proto, not OpenEngine")

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        generated_token_ids: Sequence[int] = (),
        kv_source: KVSource | None = None,
        group_id: str = "",
        images: Sequence[Any] = (),
        lora_name: str = "",
    ) -> AsyncIterator[GenerateChunk]:
        """The engine's Generate stream as tandem's chunks; closing the iterator early cancels
        the rpc. A resumed choice (`generated_token_ids`) continues from prompt + generated."""
        if images:
            raise unimplemented("images: image inputs go through tandem's proto only")
        if sampling.is_ranked:
            raise unimplemented("best_of / use_beam_search: ranked choices go through tandem's proto only")
        if lora_name:
            raise unimplemented(f"LoRA adapters (model={lora_name!r}) go through tandem's proto only")
        if kv_source is not None:
            raise unimplemented("kv_source: KV hand-off goes through tandem's proto, not OpenEngine")
        if generated_token_ids:
            if sampling.n != 1:
                raise unimplemented("resuming a request of several choices is not possible over OpenEngine")
            sampling = resumed(sampling, len(generated_token_ids))
        msg = generation_pb2.GenerateRequest(
            request_id=request_id,
            token_ids=generation_pb2.TokenIds(ids=[*prompt_token_ids, *generated_token_ids]),
        )
        sampling_to_openengine(sampling, msg)
        call = self._inference.Generate(msg, timeout=time_left())
        try:
            async for r in call:
                yield self._chunk(r, first_choice_index, len(prompt_token_ids), len(generated_token_ids))
        finally:
            call.cancel()  # client gone or an early stop: the engine aborts a cancelled stream

    @staticmethod
    def _chunk(
        r: generation_pb2.GenerateResponse, first: int, num_prompt: int, num_resumed: int
    ) -> GenerateChunk:
        event = r.WhichOneof("event")
        choices: tuple[ChoiceDelta, ...] = ()
        prompt_logprobs: tuple[TokenLogprob, ...] = ()
        if event == "token":
            tokens = r.token.tokens
            logprobs = (
                tuple(_logprob(t) for t in tokens) if all(t.HasField("logprob") for t in tokens) else ()
            )
            choices = (
                ChoiceDelta(first + r.token.output_index, tuple(t.token_id for t in tokens), logprobs, None),
            )
        elif event == "finished":
            choices = (ChoiceDelta(first + r.finished.output_index, (), (), _FINISH[r.finished.reason]),)
        elif event == "prompt":  # tandem's shape: logprobs of prompt tokens 1.. only
            prompt_logprobs = tuple(_logprob(t) for t in r.prompt.tokens[1:num_prompt])
        elif event == "error":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), r.error.message
            )
        usage = None
        if r.HasField("usage"):
            u = r.usage
            # a resumed choice's earlier tokens are not prompt, and this engine did not produce them
            # (tandem's accounting: the gateway adds them)
            prompt = u.prompt_tokens - num_resumed
            usage = Usage(prompt, u.completion_tokens, min(u.cached_prompt_tokens, prompt))
        return GenerateChunk(choices=choices, prompt_logprobs=prompt_logprobs, usage=usage)
