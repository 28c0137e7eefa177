"""The tandem.v1.Worker gRPC servicer: protobuf <-> engine dataclasses, and nothing else.

This and kv_wire.py (FetchKV's chunk codec) are the worker modules that import the generated
`worker_pb2` / `common_pb2`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeAlias, TypeVar

import grpc
import torch

import tandem
from services.common import metrics, switches, telemetry
from services.common.channels import make_channel
from services.common.logging import request_id_var
from services.worker import kv_nixl, kv_streams, kv_transfer, kv_transports, kv_wire, kv_wire_helpers
from services.worker.async_engine import AsyncEngine
from services.worker.engine import Engine
from services.worker.errors import ImageNotCachedError, task_mismatch
from services.worker.generate_mux import GenerateMux, SessionContext
from services.worker.grammar_check import CHECK_NICENESS, CHECK_STACK_BYTES, WORKER_STACK_FACTOR
from services.worker.guided import GUIDED_KINDS, GuidedSpec, GuidedUnavailableError, choice_spec
from services.worker.kv_cache import KV_DTYPE_NAMES, KV_LAYOUT
from services.worker.kv_events import EventKind, KvEvent
from services.worker.kv_handles import HeldKV, KVHandleError
from services.worker.kv_layerwise import LayerProgress, LayerwiseFailed
from services.worker.kv_peers import PeerTransferLog
from services.worker.lora.adapter import LoRAAdapterError
from services.worker.lora.registry import LoRAInfo, LoRANotFoundError
from services.worker.mm_inputs import images_from_pb
from services.worker.outputs import ChoiceOutput, RequestOutput, merge_outputs, single_token
from services.worker.request import (
    EngineRequest,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
    validate_request,
)
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "tandem.v1.Worker"
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
_FINISH_NAMES = {pb: name for name, pb in _FINISH.items()}
_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
_ROLES = {
    "unified": worker_pb2.WORKER_ROLE_UNIFIED,
    "prefill": worker_pb2.WORKER_ROLE_PREFILL,
    "decode": worker_pb2.WORKER_ROLE_DECODE,
}
_TASKS = {"generate": worker_pb2.WORKER_TASK_GENERATE, "embed": worker_pb2.WORKER_TASK_EMBED}
# A layer-wise stream's keep-alive: an empty KVChunk (kv_transfer.KEEP_ALIVE_S).
KEEP_ALIVE_BYTES = worker_pb2.KVChunk().SerializeToString()
# NIXL: the span size a prefill worker offers (one READ each; bigger than gRPC's chunks, which
# are messages, since a NIXL span costs only its descriptors).
NIXL_SPAN_BYTES = 64 << 20
# A decode worker gives a FetchKV stream this long before it computes the prompt itself.
FETCH_TIMEOUT_S = 60.0
# A parallel fetch's first stream, its own layers sent, waits this long for the further streams
# to join (the decode worker opens them as soon as it reads the first message) before it ends.
JOIN_TIMEOUT_S = 10.0
_TRANSPORTS_PB = {
    "grpc": worker_pb2.KV_TRANSPORT_GRPC,
    "cuda-ipc": worker_pb2.KV_TRANSPORT_CUDA_IPC,
    "nixl": worker_pb2.KV_TRANSPORT_NIXL,
}
_TRANSPORTS: dict[int, kv_transports.Transport] = {
    worker_pb2.KV_TRANSPORT_GRPC: "grpc",
    worker_pb2.KV_TRANSPORT_CUDA_IPC: "cuda-ipc",
    worker_pb2.KV_TRANSPORT_NIXL: "nixl",
}
_EVENT_KINDS = {
    "stored": worker_pb2.KV_EVENT_KIND_STORED,
    "evicted": worker_pb2.KV_EVENT_KIND_EVICTED,
    "snapshot": worker_pb2.KV_EVENT_KIND_SNAPSHOT,
}
FETCH_KV_METHOD = "/tandem.v1.Worker/FetchKV"
T = TypeVar("T")
# What a Generate call runs against: its rpc's context, or its GenerateMany session's.
Context: TypeAlias = "grpc.aio.ServicerContext | SessionContext"
# Threads that compile guided grammars (llguidance releases the GIL while it builds one).
GRAMMAR_THREADS = 2


def guided_from_pb(sp: common_pb2.SamplingParams) -> GuidedSpec | None:
    if not sp.HasField("guided"):
        return None
    g = sp.guided
    kind = g.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequestError("sampling.guided", f"set one constraint: {', '.join(GUIDED_KINDS)}")
    if kind == "json_object":
        if not g.json_object:
            raise InvalidRequestError("sampling.guided.json_object", "must be true when set")
        return GuidedSpec("json_object", "")
    if kind == "choice":
        return choice_spec(list(g.choice.values))
    text = getattr(g, kind)
    if not text:
        raise InvalidRequestError(f"sampling.guided.{kind}", "must be non-empty")
    return GuidedSpec(kind, text)


# Fields whose unset value means the dataclass default (services/common/sampling.py decides it).
_OPTIONAL_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "n",
    "logprobs",
    "prompt_logprobs",
    "best_of",
    "length_penalty",
)
_EARLY_STOPPING: dict[int, bool | str] = {
    common_pb2.EARLY_STOPPING_FALSE: False,
    common_pb2.EARLY_STOPPING_TRUE: True,
    common_pb2.EARLY_STOPPING_NEVER: "never",
}


def sampling_from_pb(sp: common_pb2.SamplingParams) -> SamplingParams[GuidedSpec]:
    """The proto as the dataclass, unchecked: the engine validates it when it admits the request."""
    given = {name: getattr(sp, name) for name in _OPTIONAL_SAMPLING if sp.HasField(name)}
    return SamplingParams(
        **given,
        min_tokens=sp.min_tokens,
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        guided=guided_from_pb(sp),
        logit_bias=tuple(sorted(sp.logit_bias.items())),  # a map's order is unspecified
        use_beam_search=sp.use_beam_search,
        # an unknown enum value (a newer client) is refused by validate_sampling, by name
        early_stopping=_EARLY_STOPPING.get(sp.early_stopping, str(sp.early_stopping)),
    )


def request_from_pb(msg: worker_pb2.GenerateRequest) -> EngineRequest:
    return EngineRequest(
        request_id=msg.request_id,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        sampling=sampling_from_pb(msg.sampling),
        generated_token_ids=tuple(msg.generated_token_ids),
        first_choice_index=msg.first_choice_index,
        group_id=msg.group_id,
        images=images_from_pb(msg.images),
        lora_name=msg.lora_name,
    )


def _lora_info_pb(info: LoRAInfo) -> worker_pb2.LoRAAdapterInfo:
    return worker_pb2.LoRAAdapterInfo(
        lora_name=info.name, lora_path=info.path, rank=info.rank, digest=info.digest
    )


def logprob_to_pb(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_pb(lp: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        lp.token_id, lp.logprob, lp.rank, tuple((t.token_id, t.logprob) for t in lp.top_logprobs)
    )


def output_to_pb(out: RequestOutput) -> worker_pb2.GenerateResponse:
    return fill_output_pb(worker_pb2.GenerateResponse(), out)


def fill_output_pb(msg: worker_pb2.GenerateResponse, out: RequestOutput) -> worker_pb2.GenerateResponse:
    """Write `out` into the empty `msg` (in place: a GenerateMany session's chunk is built inside
    the stream's next message). Returns msg."""
    msg.request_id = out.request_id
    for choice in out.choices:
        fill_choice_pb(msg.choices.add(), choice)
    if out.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(logprob_to_pb(lp) for lp in out.prompt_logprobs)
    if out.usage is not None:
        usage = msg.usage
        usage.SetInParent()  # (present even when every count is zero)
        usage.prompt_tokens = out.usage.prompt_tokens
        usage.completion_tokens = out.usage.completion_tokens
        usage.cached_prompt_tokens = out.usage.cached_prompt_tokens
    return msg


def emit_output(context: SessionContext, out: RequestOutput, first_choice_index: int) -> None:
    """Send `out`, a GenerateMany session's mid-stream output, from outside the session's task
    (`take`): as a packed token where it is one token of the request's first choice and nothing
    else and the stream takes one (generate_mux.py), else as a chunk built in the next message."""
    token_id = single_token(out, first_choice_index)
    if token_id is None or not context.emit_token(token_id):
        context.emit(functools.partial(fill_output_pb, out=out))


def fingerprint(engine: Engine) -> str:
    cfg = engine.model_config
    parts = [cfg.architecture, engine.served_model_name, str(engine.dtype), str(engine.config.block_size)]
    # The model's KV layout, not the group's: KV moves between workers of any tensor / pipeline
    # layout in the model's layout (kv_reshard.py).
    parts += [str(cfg.num_layers), str(cfg.num_kv_heads), str(cfg.head_dim), KV_LAYOUT]
    if engine.kv_dtype != engine.dtype:  # (unchanged fingerprints for a cache in the model dtype)
        parts.append(f"kv:{engine.kv_dtype}")
    if engine.quantization != "none":  # quantized weights compute a different KV
        parts.append(f"weights:{engine.quantization}{engine.config.quantization_group_size or ''}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def merge_kv_events(events: list[KvEvent]) -> list[tuple[int, EventKind, list[int]]]:
    """Consecutive events of one kind as one message (sequence, kind, hashes): a step's stores (or
    evictions) of many requests go out together. Its sequence is the last merged event's, so a
    subscriber resumes after all of them; applying it is applying them in order (a set updated by
    each). A snapshot is never merged."""
    merged: list[tuple[int, EventKind, list[int]]] = []
    for event in events:
        if merged and event.kind == merged[-1][1] and event.kind != "snapshot":
            hashes = merged[-1][2]
            hashes.extend(event.hashes)
            merged[-1] = (event.sequence, event.kind, hashes)
        else:
            merged.append((event.sequence, event.kind, list(event.hashes)))
    return merged


def kv_source_from_pb(msg: worker_pb2.GenerateRequest) -> kv_transfer.KVSource | None:
    if not msg.HasField("kv_source"):
        return None
    h = msg.kv_source
    return kv_transfer.KVSource(h.handle_id, h.address, h.num_tokens, h.fingerprint, h.layerwise)


def encode_chunk(chunk: kv_transfer.KVChunkData) -> bytes:
    """A KVChunk's wire bytes, the data spliced in from the host buffer (kv_wire.py)."""
    head = worker_pb2.KVChunk(
        layer_start=chunk.layer_start,
        layer_end=chunk.layer_end,
        block_start=chunk.block_start,
        block_end=chunk.block_end,
    )
    return kv_wire.encode_chunk(head, worker_pb2.KVChunk(dtype=chunk.dtype, shape=chunk.shape), chunk.data)


def _same_chunk(chunk: kv_transfer.KVChunkData) -> kv_transfer.KVChunkData:
    return chunk


def choice_to_pb(choice: ChoiceOutput) -> worker_pb2.ChoiceDelta:
    return fill_choice_pb(worker_pb2.ChoiceDelta(), choice)


def fill_choice_pb(delta: worker_pb2.ChoiceDelta, choice: ChoiceOutput) -> worker_pb2.ChoiceDelta:
    """Write `choice` into the empty `delta` (in place). Returns delta."""
    delta.index = choice.index
    delta.token_ids.extend(choice.token_ids)
    if choice.logprobs is not None:
        delta.logprobs.extend(logprob_to_pb(lp) for lp in choice.logprobs)
    if choice.finish_reason is not None:
        delta.finish_reason = _FINISH[choice.finish_reason]
    if choice.stop_token_id is not None:
        delta.stop_token_id = choice.stop_token_id
    if choice.cumulative_logprob is not None:
        delta.cumulative_logprob = choice.cumulative_logprob
    return delta


def choice_from_pb(delta: worker_pb2.ChoiceDelta) -> ChoiceOutput:
    """A ChoiceDelta as the engine's ChoiceOutput (the prefill's first token, KVChunk.first)."""
    return ChoiceOutput(
        index=delta.index,
        token_ids=tuple(delta.token_ids),
        logprobs=tuple(logprob_from_pb(lp) for lp in delta.logprobs) if delta.logprobs else None,
        finish_reason=_FINISH_NAMES.get(delta.finish_reason),
        stop_token_id=delta.stop_token_id if delta.HasField("stop_token_id") else None,
    )


def chunk_from_wire(
    wire: kv_wire.WireChunk,
) -> (
    kv_transfer.KVChunkData
    | kv_transfer.IpcBlocks
    | kv_transfer.NixlSpan
    | kv_transfer.PrefillDone
    | kv_transfer.KeepAlive
):
    msg = wire.header
    if not wire.data and msg.layer_end == 0 and not msg.ListFields():
        return kv_transfer.KEEP_ALIVE
    if msg.HasField("nixl"):
        n = msg.nixl
        remote = kv_nixl.NixlRemote(
            n.agent_name, n.agent_metadata, n.base_address, n.num_blocks, n.device_id, n.on_gpu
        )
        span = (msg.layer_start, msg.layer_end, msg.block_start, msg.block_end)
        return kv_transfer.NixlSpan(remote, span, tuple(n.block_ids))
    if msg.HasField("first"):  # a layer-wise stream's end: the prefill's sampled token
        return kv_transfer.PrefillDone(choice_from_pb(msg.first))
    if msg.HasField("cuda_ipc"):
        ipc = msg.cuda_ipc
        shared = kv_transports.SharedTensor(ipc.tensor_id, ipc.tensor_handle)
        return kv_transfer.IpcBlocks(shared, ipc.block_start, tuple(ipc.block_ids))
    return kv_transfer.KVChunkData(
        msg.layer_start,
        msg.layer_end,
        msg.block_start,
        msg.block_end,
        wire.data,
        msg.dtype,
        tuple(msg.shape),
        release=wire.release,
    )


def _identity(raw: bytes) -> bytes:
    return raw


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine) -> None:
        self.async_engine = engine
        self.engine = engine.engine
        self.fingerprint = fingerprint(self.engine)
        # where decode workers reach this worker's FetchKV; main sets it once the server is bound
        self.advertise_address = self.engine.config.kv_advertise_address
        tls = self.engine.config.tls
        self._credentials = tls.channel_credentials() if tls is not None else None
        # prefill workers we fetch from, by (address, stream index of a parallel fetch)
        self._kv_channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        # gRPC fetches this worker serves over several streams (kv_streams.py), and how many it asks for
        self.parallel_fetches = kv_streams.ParallelFetches()
        # the auto stream and helper counts both read the cores this process may run on
        cpus = kv_wire_helpers.available_cpus()
        self.kv_fetch_streams = self.engine.config.kv_fetch_streams or kv_streams.default_streams(cpus)
        # the most streams this worker serves one fetch over (1: as a worker that predates them)
        self.max_serve_streams = kv_streams.MAX_STREAMS
        # --kv-wire-helpers: processes that carry the further streams (started with the server)
        self.wire_helpers: kv_wire_helpers.WireHelpers | None = None
        num_helpers = self.engine.config.kv_wire_helpers
        if num_helpers < 0:  # auto
            num_helpers = kv_wire_helpers.auto_count(self.engine.config.role, self.engine.device.type, cpus)
        self.num_wire_helpers = num_helpers
        if num_helpers and not self.engine.config.kv_fetch_streams:  # one stream each, and this one
            self.kv_fetch_streams = max(self.kv_fetch_streams, min(num_helpers + 1, kv_streams.MAX_STREAMS))
        # Transports this worker serves and uses (tests may narrow or widen them), and what it asks for.
        world_size = self.engine.tp_size * self.engine.pp_size
        self.kv_transports = kv_transports.supported(
            self.engine.device, self.engine.config.kv_transport, world_size
        )
        # NIXL: this worker's agent, its KV cache registered once, now (kv_nixl.py)
        self.nixl: kv_nixl.NixlEndpoint | None = None
        if "nixl" in self.kv_transports:
            self.nixl, why = kv_nixl.create(self.engine.kv_cache.tensor)
            if self.nixl is None:
                log.warning("NIXL not offered: %s", why)
                self.kv_transports = tuple(t for t in self.kv_transports if t != "nixl")
        self.kv_preferences = kv_transports.preferences(
            self.engine.config.kv_transport, self.kv_transports, self.engine.device, world_size
        )
        self.fetch_stats: list[kv_transfer.FetchStats] = []  # the last few, for tests and logs
        self.peer_transfers = PeerTransferLog()  # per prefill worker and transport: Info, /metrics
        # Prefill workers whose CUDA IPC fetch failed here (e.g. no shared /dev/shm between
        # containers): later fetches from them skip it rather than fail and recompute every time.
        self._ipc_failed: set[str] = set()
        # Prefill workers' wire helper addresses this worker could not reach (e.g. a network that
        # lets only the worker's own port through): their streams go to the worker's address.
        self._helpers_unreachable: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._grammar_pool = _grammar_pool(CHECK_STACK_BYTES * WORKER_STACK_FACTOR)
        self.max_pending = self.engine.config.max_pending_requests
        self.num_pending = 0  # Generate / Prefill calls held now (admission, `_admit`)
        self._muxes: set[GenerateMux] = set()  # the open GenerateMany streams
        self._chunks_emitted = 0  # by GenerateMany streams that have ended (num_chunks_emitted)
        self._tokens_packed = 0  # likewise (num_tokens_packed)
        self._draining = False
        _export_load_gauges(engine)

    @contextlib.contextmanager
    def _admit(self):  # type: ignore[no-untyped-def]
        """Count a Generate / Prefill call while it runs; the caller refuses it first when full."""
        self.num_pending += 1
        try:
            yield
        finally:
            self.num_pending -= 1

    async def _refuse_when_full(self, context: Context) -> None:
        """RESOURCE_EXHAUSTED past --max-pending-requests: the caller's back-pressure (another
        worker or a 429), never a sign that this worker is broken."""
        if self.max_pending and self.num_pending >= self.max_pending:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this worker holds {self.num_pending} requests (--max-pending-requests "
                f"{self.max_pending}); retry later or on another worker",
            )

    def _request_failed(self, req: EngineRequest, error: str) -> tuple[grpc.StatusCode, str]:
        """The status of a request the engine failed: guided decoding failing is the request's
        constraint (INVALID_ARGUMENT naming its field); anything else is ours (INTERNAL)."""
        spec = req.sampling.guided
        if spec is not None and error.startswith("guided decoding failed"):
            log.warning("request %s failed: %s: %s", req.request_id, spec.field, error)
            return grpc.StatusCode.INVALID_ARGUMENT, f"{spec.field}: {error}"
        log.error("request %s failed: %s", req.request_id, error)
        return grpc.StatusCode.INTERNAL, error

    async def _compile_grammar(self, req: EngineRequest, context: Context) -> EngineRequest:
        """Compile the request's guided constraint on the grammar threads (never on the event loop
        or the engine thread: a big schema takes a while); refuse it with the right status."""
        spec = req.sampling.guided
        if spec is None:
            return req
        if self.engine.grammars is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"sampling.guided: {self.engine.guided_unavailable}"
            )
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(self._grammar_pool, self.engine.compile_grammar, req)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except GuidedUnavailableError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"sampling.guided: {exc}")
        metrics.counter(metrics.GUIDED_REQUESTS).labels(kind=spec.kind).inc()
        return req

    async def _resolve_lora(self, req: EngineRequest, context: Context) -> EngineRequest:
        """The request's adapter by name (NOT_FOUND when this worker does not serve it)."""
        if not req.lora_name:
            return req
        try:
            return replace(req, lora=self.engine.loras.get(req.lora_name))
        except LoRANotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    # ---- LoRA adapters (services/worker/lora/) ---------------------------------------------------
    async def LoadLoRA(
        self, request: worker_pb2.LoadLoRARequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoRAAdapterInfo:
        if not request.lora_name or not request.lora_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lora_name and lora_path are required")
        loop = asyncio.get_running_loop()
        try:  # reading the files is blocking work: off the event loop, and off the engine thread
            info = await loop.run_in_executor(
                None, self.engine.loras.load, request.lora_name, request.lora_path
            )
        except LoRAAdapterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"lora_path: {exc}")
        log.info("loaded LoRA adapter %r from %s (rank %d)", info.name, info.path, info.rank)
        return _lora_info_pb(info)

    async def UnloadLoRA(
        self, request: worker_pb2.UnloadLoRARequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadLoRAResponse:
        try:
            self.engine.loras.unload(request.lora_name)
        except LoRANotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("unloaded LoRA adapter %r", request.lora_name)
        return worker_pb2.UnloadLoRAResponse()

    async def ListLoRAs(
        self, request: worker_pb2.ListLoRAsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListLoRAsResponse:
        loras = self.engine.loras
        return worker_pb2.ListLoRAsResponse(
            adapters=[_lora_info_pb(i) for i in loras.list()],
            max_loras=loras.max_loras if loras.enabled else 0,
            max_lora_rank=loras.max_rank,
        )

    def _check_kv_source(self, source: kv_transfer.KVSource, req: EngineRequest) -> None:
        if not source.handle_id or not source.address:
            raise InvalidRequestError("kv_source", "handle_id and address are required")
        if source.num_tokens != len(req.prompt_token_ids):
            raise InvalidRequestError(
                "kv_source.num_tokens",
                f"the handle holds {source.num_tokens} tokens but the prompt has {len(req.prompt_token_ids)}",
            )
        # (several sequences, fan_out.py: each samples its own first token here, none comes along;
        # a layer-wise handle's first token comes at the end of its fetch)
        if not req.generated_token_ids and req.sampling.num_sequences == 1 and not source.layerwise:
            raise InvalidRequestError(
                "kv_source", "needs generated_token_ids (at least the first token the prefill worker sampled)"
            )

    async def _refuse_other_task(self, task: str, context: Context) -> None:
        """FAILED_PRECONDITION for an rpc of the task this worker does not run (--task)."""
        if task != self.engine.config.task:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, task_mismatch(self.engine.config.task))

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        request_id_var.set(request.request_id or "-")
        async for chunk in self._generate_call(request, context):
            yield chunk

    async def _generate_call(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext | SessionContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One Generate call: a Generate rpc, or a GenerateMany session (generate_mux.py)."""
        await self._refuse_other_task("generate", context)
        await self._refuse_when_full(context)
        with self._admit():
            async for chunk in self._generate(request, context):
                yield chunk

    async def GenerateMany(
        self,
        request_iterator: AsyncIterator[worker_pb2.GenerateManyRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        mux = GenerateMux(self._generate_call, context.write, self.async_engine.expect)
        self._muxes.add(mux)
        if self._draining:
            mux.drain()
        try:
            await mux.serve(request_iterator)
        finally:
            self._muxes.discard(mux)
            self._chunks_emitted += mux.chunks_emitted
            self._tokens_packed += mux.tokens_packed

    async def drain(self) -> None:
        """The server drains: GenerateMany streams refuse new sessions and end after their last."""
        self._draining = True
        for mux in self._muxes:
            mux.drain()

    def num_chunks_emitted(self) -> int:
        """GenerateMany chunks that went out from the engine step's callback, not their session's
        task (`_generate`'s `take`), over this servicer's streams so far."""
        return self._chunks_emitted + sum(mux.chunks_emitted for mux in self._muxes)

    def num_tokens_packed(self) -> int:
        """Of those, the chunks sent as packed tokens (GenerateManyResponse.token_ids)."""
        return self._tokens_packed + sum(mux.tokens_packed for mux in self._muxes)

    def num_generate_sessions(self) -> int:
        """Sessions open on this servicer's GenerateMany streams."""
        return sum(mux.num_sessions for mux in self._muxes)

    async def _generate(
        self, request: worker_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        source = kv_source_from_pb(request)
        try:
            req = request_from_pb(request)  # validated once, by the engine when it admits it
            if source is not None:
                self._check_kv_source(source, req)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        req = await self._resolve_lora(req, context)
        req = await self._compile_grammar(req, context)
        if source is not None and source.fingerprint != self.fingerprint:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"kv_source.fingerprint: the handle comes from an incompatible worker ({source.fingerprint}; "
                f"this worker is {self.fingerprint}: model, dtype, block size or KV layout differ)",
            )
        if source is not None and req.sampling.prompt_logprobs is not None:
            source = None  # prompt logprobs need the prompt's logits: compute it here
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Expired before it started: drop it. A deadline passing later cancels this rpc, and
            # the `finally` below aborts the request, which frees its KV blocks.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline has passed")
        arrival = context.arrived if isinstance(context, SessionContext) else time.monotonic()
        trace_parent = telemetry.capture_context()  # the rpc span: parent of the engine-phase spans
        first_token: float | None = None
        finished = False
        fetch: asyncio.Task[None] | None = None
        # True while the loop below waits on an empty queue, every earlier output sent
        parked = False
        session = context if isinstance(context, SessionContext) else None
        first_index = req.first_choice_index

        def take(item: RequestOutput) -> bool:
            """A GenerateMany session's mid-stream output that arrives while the loop is parked
            goes out here, in the callback that delivers the engine step (AsyncEngine's sink), so
            the session's task is not woken once per step. The loop below still takes the last
            output, errors, handles and whatever arrives while it is not parked, in order."""
            nonlocal first_token
            if not parked or item.finished or item.error is not None or item.kv_handle is not None:
                return False
            if not outputs.empty():  # (an earlier output is still to be read by the loop)
                return False
            if first_token is None and any(c.token_ids for c in item.choices):
                first_token = time.monotonic()
            assert session is not None
            emit_output(session, item, first_index)
            return True

        if source is None:
            sink = take if session is not None and switches.GENERATE_SINK.value else None
            outputs = self.async_engine.submit(req, sink=sink)
        else:
            outputs = self.async_engine.submit(req, add=self.engine.add_fetching_request)
            # The fetch runs beside the output loop: a layer-wise prefill's first token is this
            # stream's first output as soon as it arrives (Engine.kv_first_token), before the
            # rest of the fetch has landed.
            fetch = asyncio.create_task(self._fetch_into(req.request_id, source, outputs))
        if isinstance(context, SessionContext):
            context.admitted()  # the request is in the engine's queue: its next step may go
        try:
            leftover: RequestOutput | BaseException | None = None
            while not finished:
                if leftover is None:
                    parked = True
                    item = await outputs.get()
                    parked = False
                else:
                    item, leftover = leftover, None
                if isinstance(item, ImageNotCachedError):  # the caller resends the pixels
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(item))
                if isinstance(item, InvalidRequestError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, LoRANotFoundError):  # unloaded since _resolve_lora
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(item))
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                assert isinstance(item, RequestOutput)
                if item.error is not None:  # the engine failed it (ended: nothing to abort)
                    finished = True
                    await context.abort(*self._request_failed(req, item.error))
                if not item.finished and item.kv_handle is None:
                    # Outputs that queued up while this loop was sending go out as one message.
                    batch = [item]
                    while not outputs.empty():
                        nxt = outputs.get_nowait()
                        if not isinstance(nxt, RequestOutput) or nxt.error is not None or nxt.kv_handle:
                            leftover = nxt  # taken on its own next round
                            break
                        batch.append(nxt)
                        if nxt.finished:
                            break
                    item = merge_outputs(batch)
                if first_token is None and any(c.token_ids for c in item.choices):
                    first_token = time.monotonic()
                    telemetry.event("first_token_sent")
                finished = item.finished
                if finished and item.usage is not None:
                    _observe_finished(
                        req.request_id, item, arrival, first_token, self.async_engine, trace_parent
                    )
                yield output_to_pb(item)
        finally:
            parked = False  # (nothing more goes out through `take`)
            self.async_engine.scheduled_at.pop(req.request_id, None)
            if not finished:  # the client went away (or we failed): free the request's blocks now
                self.async_engine.abort_nowait(req.request_id)
                if fetch is not None:
                    fetch.cancel()  # (its stream closes: the prefill worker frees the handle)
                    await asyncio.wait([fetch])
            elif fetch is not None:  # (ended by its first token: the fetch is closing its stream)
                await fetch

    async def _fetch_into(
        self,
        request_id: str,
        source: kv_transfer.KVSource,
        outputs: asyncio.Queue[RequestOutput | BaseException],
    ) -> None:
        """Fetch a Generate's prompt KV (kv_transfer.receive); an unexpected error fails the
        Generate through its output queue (its `finally` aborts the request)."""
        try:
            stats = await kv_transfer.receive(
                self.async_engine.call,
                self.engine,
                self.engine.kv_cache,
                request_id,
                source,
                self._fetch_kv,
                self.engine.config.kv_fetch_stall_timeout,
                nixl=self.nixl,
            )
        except Exception as exc:
            outputs.put_nowait(exc)
            return
        self._record_fetch(source.address, stats)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(num_aborted=await self.async_engine.abort(list(request.request_ids)))

    async def Info(
        self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        e = self.engine
        cfg = e.model_config
        dtype = _DTYPE_NAMES.get(str(e.dtype), str(e.dtype))
        device = str(e.device)
        if e.device.type == "cuda":
            import torch

            device = f"{device} {torch.cuda.get_device_name(e.device)}"
        return worker_pb2.WorkerInfo(
            model_name=e.served_model_name,
            architecture=cfg.architecture,
            dtype=dtype,
            max_model_len=e.max_model_len,
            block_size=e.config.block_size,
            role=_ROLES[e.config.role],
            weight_bytes=e.weight_bytes,
            quantization=e.quantization,
            kv_layout=worker_pb2.KVLayout(
                num_layers=e.kv_cache.tensor.shape[0],  # rank 0's (its pipeline stage's)
                num_kv_heads=e.kv_cache.tensor.shape[4],  # this rank's (tensor parallelism)
                head_dim=cfg.head_dim,
                block_size=e.config.block_size,
                dtype=KV_DTYPE_NAMES[e.kv_dtype],  # --kv-cache-dtype fp8: float8_e4m3fn, not the model's
                layout=KV_LAYOUT,
                model_num_layers=cfg.num_layers,
                model_num_kv_heads=cfg.num_kv_heads,
            ),
            vocab_size=cfg.vocab_size,
            eos_token_ids=cfg.eos_token_ids,
            tensor_parallel_size=e.tp_size,
            pipeline_parallel_size=e.pp_size,
            device=device,
            fingerprint=self.fingerprint,
            num_kv_blocks=e.block_manager.num_blocks,
            max_num_seqs=e.config.max_num_seqs,
            version=tandem.__version__,
            kv_transports=[_TRANSPORTS_PB[t] for t in self.kv_transports],
            host_id=kv_transports.host_id(),
            kv_events=e.kv_events is not None,
            kv_layerwise=e.supports_layerwise,
            task=_TASKS[e.config.task],
            hidden_size=cfg.hidden_size,
            speculative=_speculative_info(e),
            kv_peer_transfers=[
                worker_pb2.KVPeerTransfer(
                    peer_address=p.peer_address,
                    transport=_TRANSPORTS_PB[p.transport],
                    num_transfers=p.num_transfers,
                    num_failed=p.num_failed,
                    bytes=p.num_bytes,
                    seconds=p.seconds,
                    gb_per_s=p.gb_per_s,
                    last_bytes=p.last_bytes,
                    last_seconds=p.last_seconds,
                    last_gb_per_s=p.last_gb_per_s,
                )
                for p in self.peer_transfers.entries()
            ],
            num_images_encoded=e.runner.encoder_cache.misses,
            num_encoder_cache_hits=e.runner.encoder_cache.hits,
            encoder_cache_size=e.encoder_cache_size,
            num_images_by_hash=e.runner.encoder_cache.by_hash,
            num_image_hash_misses=e.runner.encoder_cache.hash_misses,
            image_bytes_received=e.runner.encoder_cache.bytes_received,
        )

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Load:
        load = self.async_engine.load
        return worker_pb2.Load(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_kv_blocks_used=load.num_kv_blocks_used,
            num_kv_blocks_total=load.num_kv_blocks_total,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            num_waiting_tokens=load.num_waiting_tokens,
            num_kv_handles=len(self.engine.kv_handles),
            num_preemptions=load.num_preemptions,
            num_swapped_out=load.num_swapped_out,
            num_swapped_in=load.num_swapped_in,
        )

    # ---- disaggregation (handles: kv_handles.py; the wire: kv_transfer.py; state: engine.py) ------------------------
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        request_id_var.set(request.request_id or "-")
        await self._refuse_other_task("generate", context)
        await self._refuse_when_full(context)
        with self._admit():
            reply = worker_pb2.PrefillResponse()
            async for event in self._prefill(request, context, layerwise=False):
                reply = event.response
            return reply

    async def PrefillStream(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PrefillEvent]:
        """Layer-wise push: the handle as soon as the prompt is admitted, then the response."""
        request_id_var.set(request.request_id or "-")
        await self._refuse_other_task("generate", context)
        if not self.engine.supports_layerwise:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker offers no layer-wise push (a parallel group): use Prefill",
            )
        await self._refuse_when_full(context)
        with self._admit():
            async for event in self._prefill(request, context, layerwise=True):
                yield event

    async def Encode(
        self, request: worker_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EncodeResponse:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this worker's role is {self.engine.config.role}: Encode is served by --role encode workers",
        )
        raise AssertionError("unreachable: abort raises")

    async def Embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        request_id_var.set(request.request_id or "-")
        await self._refuse_other_task("embed", context)
        await self._refuse_when_full(context)
        with self._admit():
            return await self._embed(request, context)

    async def _embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        """Each input is one pooling request of the engine (all in one fairness group), submitted
        together so the scheduler batches them with each other and with other calls' inputs."""
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be non-empty")
        if not request.inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inputs: give at least one input")
        reqs = [
            EngineRequest(
                request_id=f"{request.request_id}-{i}",
                prompt_token_ids=tuple(item.token_ids),
                pooling=True,
                group_id=request.request_id,
            )
            for i, item in enumerate(request.inputs)
        ]
        # every input checked before any is queued: one bad input costs the others nothing
        for i, req in enumerate(reqs):
            try:
                validate_request(req, self.engine.model_config.vocab_size, self.engine.max_model_len)
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}].token_ids: {exc.message}")
        streams = [self.async_engine.submit(req) for req in reqs]
        reply = worker_pb2.EmbedResponse(request_id=request.request_id)
        done: set[int] = set()
        try:
            for i, stream in enumerate(streams):
                item = await stream.get()
                done.add(i)  # ended, or never queued (an error): nothing of it to abort
                if isinstance(item, InvalidRequestError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}]: {item}")
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                assert isinstance(item, RequestOutput) and item.finished  # pooling: one output, the last
                if item.error is not None:
                    await context.abort(grpc.StatusCode.INTERNAL, item.error)
                if item.embedding is None:  # aborted (e.g. the worker is shutting down)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"inputs[{i}]: the request was aborted")
                assert item.usage is not None
                reply.embeddings.add(
                    index=i,
                    values=item.embedding,
                    prompt_tokens=item.usage.prompt_tokens,
                    cached_prompt_tokens=item.usage.cached_prompt_tokens,
                )
        finally:
            for i, req in enumerate(reqs):
                if i not in done:  # cancelled or failed: free the other inputs' blocks now
                    self.async_engine.abort_nowait(req.request_id)
        return reply

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext, layerwise: bool
    ) -> AsyncIterator[worker_pb2.PrefillEvent]:
        """The prefill's events: with `layerwise`, its handle once the prompt is admitted (the
        handle exists from then on, kv_layerwise.py); then the response."""
        try:
            req = EngineRequest(
                request_id=request.request_id,
                prompt_token_ids=tuple(request.prompt_token_ids),
                sampling=sampling_from_pb(request.sampling),
                first_choice_index=request.first_choice_index,
                hold_kv=True,
                kv_handle_id=uuid.uuid4().hex if layerwise else "",
                lora_name=request.lora_name,
            )  # validated once, by the engine when it admits it
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        req = await self._resolve_lora(req, context)
        req = await self._compile_grammar(req, context)
        self._start_sweeper()
        outputs = self.async_engine.submit(req)
        reply = worker_pb2.PrefillResponse(request_id=req.request_id)
        held: HeldKV | None = None
        finished = False
        try:
            if layerwise:
                handle = await self._admitted_handle(req)
                if handle is not None:
                    yield worker_pb2.PrefillEvent(handle=handle)
            leftover: RequestOutput | BaseException | None = None
            while not finished:
                item = leftover if leftover is not None else await outputs.get()
                leftover = None
                if isinstance(item, InvalidRequestError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, LoRANotFoundError):  # unloaded since _resolve_lora
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(item))
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                assert isinstance(item, RequestOutput)
                finished = item.finished
                if item.error is not None:
                    await context.abort(*self._request_failed(req, item.error))
                chunk = output_to_pb(item)
                for delta in chunk.choices:
                    reply.first.index = delta.index
                    reply.first.token_ids.extend(delta.token_ids)
                    reply.first.logprobs.extend(delta.logprobs)
                    reply.first.finish_reason = delta.finish_reason or reply.first.finish_reason
                    if delta.HasField("stop_token_id"):
                        reply.first.stop_token_id = delta.stop_token_id
                reply.prompt_logprobs.extend(chunk.prompt_logprobs)
                if chunk.HasField("usage"):
                    reply.usage.CopyFrom(chunk.usage)
                if item.kv_handle is not None:
                    held = item.kv_handle
                    reply.handle.CopyFrom(
                        worker_pb2.KVHandle(
                            handle_id=held.handle_id,
                            address=self.advertise_address,
                            num_tokens=held.num_tokens,
                            expires_at_ms=held.expires_at_ms,
                            fingerprint=self.fingerprint,
                            layerwise=held.progress is not None,
                        )
                    )
        finally:
            if not finished:  # cancelled by the caller: free the prompt's blocks now
                self.async_engine.abort_nowait(req.request_id)
        if held is None and not reply.first.finish_reason:  # aborted (e.g. shutting down)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill was aborted")
        yield worker_pb2.PrefillEvent(response=reply)

    async def _admitted_handle(self, req: EngineRequest) -> worker_pb2.KVHandle | None:
        """Layer-wise push: the prompt's KV handle once the engine admitted it (a call queued
        after the submit runs after it); None when it was not (invalid: the outputs say why)."""
        store = self.engine.kv_handles
        admitted = await self.async_engine.call(lambda: req.kv_handle_id in store.handles)
        if not admitted:
            return None
        return worker_pb2.KVHandle(
            handle_id=req.kv_handle_id,
            address=self.advertise_address,
            num_tokens=len(req.prompt_token_ids),
            expires_at_ms=int((time.time() + store.ttl_s) * 1000),
            fingerprint=self.fingerprint,
            layerwise=True,
        )

    async def FetchKV(
        self, request: worker_pb2.FetchKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Yields each KVChunk's wire bytes (add_to_server registers an identity serializer)."""
        handle_id = request.handle_id
        store = self.engine.kv_handles
        if not handle_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "handle_id: must be non-empty")
        if request.stream_index:
            async for raw in self._further_stream(request, context):
                yield raw
            return
        if request.fingerprint and request.fingerprint != self.fingerprint:
            # A mismatch is a wiring mistake; the handle is single-use anyway, so free it now.
            await self.async_engine.call(lambda: store.release(handle_id, only_idle=True))
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fingerprint: the caller ({request.fingerprint}) cannot take KV from this worker "
                f"({self.fingerprint}): model, dtype, block size or KV layout differ; the handle was released",
            )
        try:
            # (not on the engine thread: a layer-wise prefill may be in the middle of its forward)
            held = store.take(handle_id)
        except KVHandleError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        block_size = self.engine.config.block_size
        num_blocks_sent = first_block = 0
        kv = self.engine.kv_cache.tensor
        transport: kv_transports.Transport = "grpc"
        streams = 1
        started = time.monotonic()
        progress = held.progress
        block_ids = held.block_ids
        try:
            if request.skip_tokens % block_size or request.skip_tokens > held.num_tokens:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"skip_tokens: {request.skip_tokens} must be a multiple of the block size {block_size} "
                    f"and at most the handle's {held.num_tokens} tokens",
                )
            first_block = request.skip_tokens // block_size
            wanted = [_TRANSPORTS[t] for t in request.transports if t in _TRANSPORTS]
            transport = kv_transports.choose(
                wanted, request.host_id, self.kv_transports, kv_transports.host_id()
            )
            if transport == "cuda-ipc" and progress is not None:
                # the whole prompt in one copy, once it is computed; the first token goes first
                async for ready in kv_transfer.wait_complete(progress):
                    if isinstance(ready, kv_transfer.KeepAlive):
                        yield KEEP_ALIVE_BYTES
                        continue
                    block_ids = ready.block_ids
                    assert isinstance(ready.first, ChoiceOutput)
                    yield worker_pb2.KVChunk(first=choice_to_pb(ready.first)).SerializeToString()
            if transport == "cuda-ipc" and first_block < len(block_ids):
                shared = kv_transports.export_tensor(kv)
                ipc = worker_pb2.CudaIpcKV(
                    tensor_handle=shared.handle,
                    tensor_id=shared.tensor_id,
                    block_ids=block_ids[first_block:],
                    block_start=first_block,
                )
                yield worker_pb2.KVChunk(
                    transport=worker_pb2.KV_TRANSPORT_CUDA_IPC, cuda_ipc=ipc
                ).SerializeToString()
                # The caller copies the blocks, then closes the stream (this task is cancelled);
                # the blocks stay held until then, or until the handle's TTL passes again.
                await asyncio.sleep(max(store.ttl_s, FETCH_TIMEOUT_S))
                log.warning("KV handle %s: the CUDA IPC reader never closed its stream", handle_id)
                return
            if transport == "nixl":
                async for raw in self._nixl_spans(block_ids, first_block, progress):
                    yield raw
                # The caller reads the spans, then closes the stream (this task is cancelled);
                # the blocks stay held until then, or until the handle's TTL passes again.
                await asyncio.sleep(max(store.ttl_s, FETCH_TIMEOUT_S))
                log.warning("KV handle %s: the NIXL reader never closed its stream", handle_id)
                return
            num_layers = self.engine.kv_cache.model_shape[0]
            if request.max_streams > 1 and self.engine.driver is None:  # (a group reads on one thread)
                streams = kv_streams.stream_count(
                    min(request.max_streams, self.max_serve_streams), num_layers
                )
            first_empty = False
            if streams > 1:  # the decode worker opens the others when it reads this
                addresses = self.wire_helpers.stream_addresses(streams) if self.wire_helpers else []
                first_empty = bool(addresses)  # (the helpers carry every layer)
                self.parallel_fetches.open(handle_id, held, streams, first_empty)
                yield worker_pb2.KVChunk(
                    transport=worker_pb2.KV_TRANSPORT_GRPC, streams=streams, stream_addresses=addresses
                ).SerializeToString()
            num_bytes = 0
            first_sent = False
            async for item in self._grpc_chunks(
                request, held, first_block, kv_streams.layer_range(num_layers, streams, 0, first_empty)
            ):
                if progress is not None and not first_sent and progress.done:
                    # A layer-wise prefill that completed while its KV is still on the way (gRPC
                    # moves it slower than the prefill writes it): the token it sampled goes
                    # before the next chunk, so the decode worker streams it to the client now.
                    snap = progress.snapshot()
                    if snap.complete:  # (not failed: the chunks' reader raises that)
                        assert isinstance(snap.first, ChoiceOutput)
                        yield worker_pb2.KVChunk(first=choice_to_pb(snap.first)).SerializeToString()
                        first_sent = True
                yield item
                num_bytes += len(item)
            if streams > 1 and not await self.parallel_fetches.wait_joined(handle_id, JOIN_TIMEOUT_S):
                log.warning("KV handle %s: a parallel fetch's further streams did not all come", handle_id)
            if progress is not None:  # the stream's end: the token the prefill sampled, if not sent
                snap = progress.snapshot()
                block_ids = snap.block_ids
                assert isinstance(snap.first, ChoiceOutput)
                if not first_sent:
                    yield worker_pb2.KVChunk(first=choice_to_pb(snap.first)).SerializeToString()
            num_blocks_sent = len(block_ids) - first_block
            metrics.observe_kv_transfer("send", num_bytes, time.monotonic() - started, transport="grpc")
        except LayerwiseFailed as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"KV handle {handle_id!r}: {exc}")
        finally:
            if transport in ("cuda-ipc", "nixl") and first_block < len(block_ids):
                num_blocks_sent = len(block_ids) - first_block
                metrics.observe_kv_transfer(
                    "send", num_blocks_sent * held_block_bytes(kv), time.monotonic() - started, transport
                )
            # Fetched, failed or cancelled: the handle is single-use, its blocks go back now (a
            # parallel fetch's: when its last stream ended).
            if streams > 1:
                self.parallel_fetches.close_joins(handle_id)
            self._leave_fetch(handle_id, streams, num_blocks_sent)

    def _leave_fetch(self, handle_id: str, streams: int, num_blocks_sent: int) -> None:
        """A stream of a fetch ended: the handle's blocks go back after its last one."""
        total = self.parallel_fetches.leave(handle_id, num_blocks_sent) if streams > 1 else num_blocks_sent
        if total is not None:
            store = self.engine.kv_handles
            self.async_engine.call(lambda: store.release(handle_id, total))

    async def _grpc_chunks(
        self, request: worker_pb2.FetchKVRequest, held: HeldKV, first_block: int, layers: tuple[int, int]
    ) -> AsyncIterator[bytes]:
        """A gRPC fetch's (or one of its parallel streams') chunks of `layers`, as wire bytes."""
        async for item in self._chunks(request, held, first_block, layers, encode_chunk):
            yield KEEP_ALIVE_BYTES if isinstance(item, kv_transfer.KeepAlive) else item

    def _chunks(
        self,
        request: worker_pb2.FetchKVRequest,
        held: HeldKV,
        first_block: int,
        layers: tuple[int, int],
        encode: Callable[[kv_transfer.KVChunkData], T],
        read_into: Callable[
            [Callable[[torch.Tensor], kv_transfer.KVChunkData]], Awaitable[kv_transfer.KVChunkData]
        ]
        | None = None,
    ) -> AsyncIterator[T | kv_transfer.KeepAlive]:
        """The chunks of `layers` (kv_transfer.stream_chunks), each `encode`d; `read_into`: read
        into a wire helper's slots (kv_wire_helpers.py)."""
        target = request.chunk_bytes or self.engine.config.kv_chunk_bytes
        return kv_transfer.stream_chunks(
            self.engine.kv_cache,
            held.block_ids,
            first_block,
            target,
            encode,
            held.progress,
            # a group's chunks are gathered from its ranks on the engine thread (kv_reshard.py)
            run=self.async_engine.call if self.engine.driver is not None else None,
            layers=layers,
            read_into=read_into,
        )

    async def _further_stream(
        self, request: worker_pb2.FetchKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Stream `stream_index` of a parallel gRPC fetch (kv_streams.py): its layer range."""
        try:
            async for item in self._further_chunks(request, encode_chunk):
                yield KEEP_ALIVE_BYTES if isinstance(item, kv_transfer.KeepAlive) else item
        except KVHandleError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    async def serve_helper_stream(self, raw_request: bytes, stream: kv_wire_helpers.ServeStream) -> None:
        """A further stream of a parallel fetch that reached one of this worker's wire helpers
        (kv_wire_helpers.py): checked and read here, into the helper's slots, and sent there."""
        try:
            request = worker_pb2.FetchKVRequest.FromString(raw_request)
            # (a chunk at most a slot: the request's chunk size is a preference)
            request.chunk_bytes = min(
                request.chunk_bytes or self.engine.config.kv_chunk_bytes, stream.slot_bytes
            )
            async for item in self._further_chunks(request, _same_chunk, stream.read_into):
                if isinstance(item, kv_transfer.KeepAlive):
                    stream.keepalive()
                else:
                    stream.chunk(item)
            stream.end()
        except KVHandleError as exc:
            stream.abort(exc.code, str(exc))

    async def _further_chunks(
        self,
        request: worker_pb2.FetchKVRequest,
        encode: Callable[[kv_transfer.KVChunkData], T],
        read_into: Callable[
            [Callable[[torch.Tensor], kv_transfer.KVChunkData]], Awaitable[kv_transfer.KVChunkData]
        ]
        | None = None,
    ) -> AsyncIterator[T | kv_transfer.KeepAlive]:
        """Stream `stream_index` of a parallel gRPC fetch: its layer range's chunks. A problem
        with the request is a KVHandleError naming its status."""
        handle_id = request.handle_id
        if request.fingerprint and request.fingerprint != self.fingerprint:
            raise KVHandleError(
                "FAILED_PRECONDITION",
                f"fingerprint: the caller ({request.fingerprint}) cannot take KV from this worker ({self.fingerprint})",
            )
        num_layers = self.engine.kv_cache.model_shape[0]
        held, layers, streams = self.parallel_fetches.join(handle_id, request.stream_index, num_layers)
        started = time.monotonic()
        num_bytes = 0
        try:
            block_size = self.engine.config.block_size
            if request.skip_tokens % block_size or request.skip_tokens > held.num_tokens:
                raise KVHandleError(
                    "INVALID_ARGUMENT",
                    f"skip_tokens: {request.skip_tokens} must be a multiple of the block size {block_size} "
                    f"and at most the handle's {held.num_tokens} tokens",
                )
            first_block = request.skip_tokens // block_size
            async for item in self._chunks(request, held, first_block, layers, encode, read_into):
                yield item
                if isinstance(item, bytes):
                    num_bytes += len(item)
                elif isinstance(item, kv_transfer.KVChunkData):
                    num_bytes += len(item.data)
            metrics.observe_kv_transfer("send", num_bytes, time.monotonic() - started, transport="grpc")
        except LayerwiseFailed as exc:
            raise KVHandleError("ABORTED", f"KV handle {handle_id!r}: {exc}") from exc
        finally:
            self._leave_fetch(handle_id, streams, 0)

    async def _nixl_spans(
        self, block_ids: tuple[int, ...], first_block: int, progress: LayerProgress | None
    ) -> AsyncIterator[bytes]:
        """A NIXL fetch's messages: each span as it becomes ready (its blocks' ids here), then a
        layer-wise handle's first token. The first carries this worker's agent metadata."""
        assert self.nixl is not None
        remote = self.nixl.describe()
        first = True
        async for batch in kv_transfer.ready_span_batches(
            self.engine.kv_cache.tensor, block_ids, first_block, NIXL_SPAN_BYTES, progress
        ):
            if isinstance(batch, kv_transfer.KeepAlive):
                yield KEEP_ALIVE_BYTES
                continue
            spans, snap = batch
            for l0, l1, b0, b1 in spans:
                where = worker_pb2.NixlKV(
                    agent_name=remote.agent_name,
                    agent_metadata=remote.agent_metadata if first else b"",
                    base_address=remote.base_address,
                    num_blocks=remote.num_blocks,
                    device_id=remote.device_id,
                    on_gpu=remote.on_gpu,
                    block_ids=snap.block_ids[b0:b1],
                )
                chunk = worker_pb2.KVChunk(
                    layer_start=l0, layer_end=l1, block_start=b0, block_end=b1, nixl=where
                )
                if first:
                    chunk.transport = worker_pb2.KV_TRANSPORT_NIXL
                    first = False
                yield chunk.SerializeToString()
        if progress is not None:
            snapshot = progress.snapshot()
            assert isinstance(snapshot.first, ChoiceOutput)
            yield worker_pb2.KVChunk(first=choice_to_pb(snapshot.first)).SerializeToString()

    async def ReleaseKV(
        self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKVResponse:
        store = self.engine.kv_handles
        released = await self.async_engine.call(lambda: store.release(request.handle_id, only_idle=True))
        return worker_pb2.ReleaseKVResponse(released=released)

    async def _fetch_kv(
        self, source: kv_transfer.KVSource, skip_tokens: int
    ) -> AsyncIterator[
        kv_transfer.KVChunkData
        | kv_transfer.IpcBlocks
        | kv_transfer.NixlSpan
        | kv_transfer.PrefillDone
        | kv_transfer.KeepAlive
    ]:
        """Decode side: the FetchKV stream of `source` from its prefill worker, its chunks' data
        viewed in the received bytes (kv_wire.py); over gRPC, the merged items of as many
        parallel streams as the prefill worker offers (kv_streams.py)."""
        request = worker_pb2.FetchKVRequest(
            handle_id=source.handle_id,
            skip_tokens=skip_tokens,
            fingerprint=self.fingerprint,
            transports=[
                _TRANSPORTS_PB[t]
                for t in self.kv_preferences
                if not (t == "cuda-ipc" and source.address in self._ipc_failed)
            ],
            host_id=kv_transports.host_id(),
            max_streams=self.kv_fetch_streams if "grpc" in self.kv_preferences else 1,
        )
        first = self._fetch_call(source.address, 0, request)
        try:
            async for wire in first:
                if wire.header.streams > 1:  # a parallel fetch: open the further streams, then merge
                    further = [
                        self._further_call(source, wire.header, index, skip_tokens)
                        for index in range(1, wire.header.streams)
                    ]
                    merged = kv_streams.merge([first, *further])
                    try:
                        async for chunk in merged:
                            yield chunk_from_wire(chunk)
                    finally:
                        await merged.aclose()
                        for stream in further:
                            await stream.aclose()
                    return
                yield chunk_from_wire(wire)
        finally:
            await first.aclose()  # (CUDA IPC, NIXL: closing the stream frees the peer's blocks)

    def _further_call(
        self, source: kv_transfer.KVSource, first: worker_pb2.KVChunk, index: int, skip_tokens: int
    ) -> AsyncGenerator[kv_wire.WireChunk, None]:
        """Further stream `index` of a parallel fetch: from where the first message says (the
        prefill worker's helper, else its own address), read by one of this worker's wire
        helpers when it has any (kv_wire_helpers.py), else here."""
        addresses = first.stream_addresses
        address = addresses[index - 1] if len(addresses) >= index else source.address
        if address in self._helpers_unreachable:
            address = source.address  # (the prefill worker serves every stream itself too)
        request = worker_pb2.FetchKVRequest(
            handle_id=source.handle_id,
            skip_tokens=skip_tokens,
            fingerprint=self.fingerprint,
            stream_index=index,
        )
        if self.wire_helpers is not None and self.wire_helpers.live():
            request.chunk_bytes = self.wire_helpers.slot_bytes  # (each chunk must fit a slot)
            stream = self.wire_helpers.read(index, address, request)
        else:
            stream = self._fetch_call(address, index, request)
        return stream if address == source.address else self._watch_helper(stream, address, source.address)

    async def _watch_helper(
        self, stream: AsyncGenerator[kv_wire.WireChunk, None], address: str, worker: str
    ) -> AsyncGenerator[kv_wire.WireChunk, None]:
        """A further stream from a prefill worker's helper at `address`: when it cannot be
        reached (UNAVAILABLE from the peer), later fetches open that stream at the worker's own
        address instead (this fetch fails, and its prompt is computed here, as for any failed fetch)."""
        try:
            async for item in stream:
                yield item
        except (grpc.aio.AioRpcError, kv_wire_helpers.WireStreamError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError):
                code = exc.code().name
            else:
                code = exc.code if exc.from_peer else ""
            if code == "UNAVAILABLE" and address not in self._helpers_unreachable:
                log.warning(
                    "the KV wire helper %s of %s is unreachable (%s); its streams go to %s from now on",
                    address,
                    worker,
                    exc,
                    worker,
                )
                self._helpers_unreachable.add(address)
            raise
        finally:
            await stream.aclose()

    async def _fetch_call(
        self, address: str, index: int, request: worker_pb2.FetchKVRequest
    ) -> AsyncGenerator[kv_wire.WireChunk, None]:
        """One FetchKV stream's chunks; a parallel fetch's stream `index` > 0 on a connection of
        its own (a channel with a local subchannel pool shares no connection)."""
        channel = self._kv_channels.get((address, index))
        if channel is None:
            options = [("grpc.use_local_subchannel_pool", 1)] if index else []
            channel = make_channel(address, self._credentials, options=options)
            self._kv_channels[address, index] = channel
        fetch = channel.unary_stream(
            FETCH_KV_METHOD,
            request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
            response_deserializer=kv_wire.decode_chunk,
        )
        call = fetch(request, timeout=FETCH_TIMEOUT_S)
        try:
            async for wire in call:
                assert isinstance(wire, kv_wire.WireChunk)
                yield wire
        finally:
            call.cancel()

    def _record_fetch(self, address: str, stats: kv_transfer.FetchStats) -> None:
        self.fetch_stats = [*self.fetch_stats[-63:], stats]
        if not stats.ok and stats.transport == "cuda-ipc" and address not in self._ipc_failed:
            log.warning(
                "CUDA IPC from %s failed (%s); using the next transport from now on", address, stats.error
            )
            self._ipc_failed.add(address)
        if stats.ok:
            metrics.observe_kv_transfer("receive", stats.num_bytes, stats.seconds, stats.transport)
        self.peer_transfers.record(address, stats)

    async def SubscribeKvEvents(
        self, request: worker_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KvEvent]:
        events = self.engine.kv_events
        if events is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this worker runs without prefix caching: no KV events"
            )
        assert events is not None
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        scheduled = False  # a wake-up is on its way to the loop (one for a step's many events)

        def woken() -> None:
            nonlocal scheduled
            scheduled = False
            wake.set()

        def notify() -> None:  # (the engine thread, after each event)
            nonlocal scheduled
            if not scheduled:
                scheduled = True
                loop.call_soon_threadsafe(woken)

        unsubscribe = events.listen(notify)
        after, epoch = request.after_sequence, request.epoch
        block_size = self.engine.config.block_size
        try:
            await context.send_initial_metadata(())  # tells the subscriber it is subscribed
            while True:
                wake.clear()
                batch = events.since(after, epoch)
                for sequence, kind, hashes in merge_kv_events(batch):
                    yield worker_pb2.KvEvent(
                        sequence=sequence,
                        kind=_EVENT_KINDS[kind],
                        block_hashes=hashes,
                        block_size=block_size,
                        epoch=events.epoch,
                    )
                    after, epoch = sequence, events.epoch
                if not batch:
                    await wake.wait()
        finally:
            unsubscribe()

    async def start_wire_helpers(self, bound_address: str) -> None:
        """--kv-wire-helpers N: spawn the helpers (kv_wire_helpers.py) on the host the server is
        bound to, reached where this worker is advertised; a failure leaves the worker without
        them (its own streams carry every fetch), with a warning."""
        config = self.engine.config
        count = self.num_wire_helpers
        if not count:
            return
        bind_host = kv_wire_helpers.split_host(bound_address)
        advertise_host = kv_wire_helpers.split_host(self.advertise_address or bound_address)
        if bind_host is None or advertise_host is None or self.engine.driver is not None:
            # (auto: quietly none, e.g. under `tandem up`, whose workers listen on unix sockets)
            (log.info if config.kv_wire_helpers < 0 else log.warning)(
                "--kv-wire-helpers: not started (they serve TCP addresses of single-rank workers; this one is %s%s)",
                bound_address,
                ", a parallel group" if self.engine.driver is not None else "",
            )
            return
        slot_bytes = kv_wire_helpers.slot_bytes_for(
            config.kv_chunk_bytes, kv_transfer.block_bytes_per_layer(self.engine.kv_cache)
        )
        try:
            self.wire_helpers = await kv_wire_helpers.WireHelpers.start(
                count,
                slot_bytes,
                bind_host,
                advertise_host,
                config.tls,
                self.serve_helper_stream,
                pin=self.engine.device.type == "cuda",
                timeout_s=FETCH_TIMEOUT_S,
            )
        except (OSError, RuntimeError) as exc:
            log.warning("--kv-wire-helpers: not started (%s); this worker carries every stream itself", exc)
            return
        log.info(
            "KV wire helpers: %d, at %s (%d slots of %d bytes a ring)",
            count,
            ", ".join(h.address for h in self.wire_helpers.helpers),
            kv_wire_helpers.RING_SLOTS,
            slot_bytes,
        )

    async def close(self) -> None:
        """Stop the handle sweeper and close the channels to prefill workers."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for channel in self._kv_channels.values():
            await channel.close()
        if self.wire_helpers is not None:
            await self.wire_helpers.close()
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        grammars = self.engine.grammars
        if grammars is not None and grammars.checker is not None:
            grammars.checker.close()

    def _start_sweeper(self) -> None:
        """Free expired KV handles in the background (started by the first Prefill)."""
        if self._sweeper is not None:
            return
        store = self.engine.kv_handles
        period = min(1.0, store.ttl_s / 4)

        async def sweep() -> None:
            while True:
                await asyncio.sleep(period)
                with contextlib.suppress(Exception):
                    await self.async_engine.call(lambda: store.expire(time.monotonic()))

        self._sweeper = asyncio.create_task(sweep())


def _lower_priority() -> None:
    """This thread yields the CPU to serving (Linux: the niceness of one thread)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)


def _grammar_pool(stack_bytes: int) -> ThreadPoolExecutor:
    """The grammar threads, started now with `stack_bytes` of stack each: a constraint compiles
    here only after it compiled in a checking child with a fraction of that (grammar_check.py)."""
    pool = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar", initializer=_lower_priority)
    barrier = threading.Barrier(GRAMMAR_THREADS)  # each task waits for the others: N threads
    previous = threading.stack_size(stack_bytes)  # read by thread creation, inside submit
    try:
        started = [pool.submit(barrier.wait) for _ in range(GRAMMAR_THREADS)]
    finally:
        threading.stack_size(previous)
    for future in started:
        future.result()
    return pool


def _speculative_info(e: Engine) -> worker_pb2.SpeculativeInfo | None:
    if e.speculator is None:
        return None
    stats = e.speculator.stats
    return worker_pb2.SpeculativeInfo(
        method=e.config.speculative_method,
        num_speculative_tokens=e.config.num_speculative_tokens,
        draft_model=Path(e.config.speculative_model).name if e.config.speculative_model else "",
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_tokens=stats.num_accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        mean_accepted_length=stats.mean_accepted_length,
    )


def _export_load_gauges(engine: AsyncEngine) -> None:
    """Queue, running and KV-cache gauges read from the engine's load snapshot at each scrape."""
    metrics.declare("worker")
    metrics.gauge_from(metrics.REQUESTS_RUNNING, lambda: engine.load.num_running)
    metrics.gauge_from(metrics.REQUESTS_WAITING, lambda: engine.load.num_waiting)
    metrics.gauge_from(
        metrics.KV_CACHE_USAGE,
        lambda: engine.load.num_kv_blocks_used / max(engine.load.num_kv_blocks_total, 1),
    )
    metrics.gauge_from(metrics.PREFIX_CACHE_HIT_RATE, lambda: engine.load.prefix_cache_hit_rate)
    metrics.gauge_from(metrics.WEIGHT_BYTES, lambda: engine.engine.weight_bytes)
    bm = engine.engine.block_manager
    metrics.gauge_from(metrics.PREFIX_CACHE_HOST_HITS, lambda: bm.num_host_hit_tokens)
    scheduler = engine.engine.scheduler
    metrics.gauge_from(metrics.PROMPT_PREFILLS, lambda: scheduler.num_prefills)
    speculator = engine.engine.speculator
    if speculator is not None:
        stats = speculator.stats
        metrics.gauge_from(metrics.SPEC_DRAFT_TOKENS, lambda: stats.num_draft_tokens)
        metrics.gauge_from(metrics.SPEC_ACCEPTED_TOKENS, lambda: stats.num_accepted_tokens)
        metrics.gauge_from(metrics.SPEC_ACCEPTANCE_RATE, lambda: stats.acceptance_rate)
        metrics.gauge_from(metrics.SPEC_MEAN_ACCEPTED_LENGTH, lambda: stats.mean_accepted_length)
    encoder_cache = engine.engine.runner.encoder_cache
    metrics.gauge_from(metrics.IMAGES_ENCODED, lambda: encoder_cache.misses)
    metrics.gauge_from(metrics.ENCODER_CACHE_HITS, lambda: encoder_cache.hits)
    metrics.gauge_from(metrics.IMAGES_BY_HASH, lambda: encoder_cache.by_hash)
    metrics.gauge_from(metrics.IMAGE_HASH_MISSES, lambda: encoder_cache.hash_misses)
    metrics.gauge_from(metrics.IMAGE_BYTES_RECEIVED, lambda: encoder_cache.bytes_received)
    metrics.gauge_from(metrics.PREEMPTIONS, lambda: engine.load.num_preemptions)
    metrics.gauge_from(metrics.KV_SWAPPED_OUT, lambda: engine.load.num_swapped_out)
    metrics.gauge_from(metrics.KV_SWAPPED_IN, lambda: engine.load.num_swapped_in)


def _observe_finished(
    request_id: str,
    final: RequestOutput,
    arrival: float,
    first_token: float | None,
    engine: AsyncEngine,
    trace_parent: telemetry.otel_context.Context | None,
) -> None:
    """Latency / token metrics and the engine-phase spans of a request that just finished."""
    assert final.usage is not None
    reasons = {c.finish_reason for c in final.choices if c.finish_reason}
    timeline = telemetry.RequestTimeline(
        request_id=request_id,
        arrival=arrival,
        finished=time.monotonic(),
        scheduled=engine.scheduled_at.get(request_id),
        first_token=first_token,
        num_prompt_tokens=final.usage.prompt_tokens,
        num_cached_tokens=final.usage.cached_prompt_tokens,
        num_output_tokens=final.usage.completion_tokens,
        finish_reason=",".join(sorted(reasons)),
    )
    metrics.observe_timeline(timeline)
    telemetry.record_request_timeline(timeline, trace_parent)


def held_block_bytes(kv: object) -> int:
    """Bytes of one block over all layers of the cache tensor `kv`."""
    import torch

    assert isinstance(kv, torch.Tensor)
    return kv[:, :, 0].numel() * kv.element_size()


class _HandlerCapture:
    """Collects the generated code's method handlers so that add_to_server can replace one."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update(handlers)


def add_to_server(server: grpc.aio.Server, engine: AsyncEngine) -> WorkerServicer:
    servicer = WorkerServicer(engine)
    capture = _HandlerCapture()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, capture)
    # FetchKV yields its chunks already serialized (kv_wire.py splices the KV bytes in).
    capture.handlers["FetchKV"] = grpc.unary_stream_rpc_method_handler(
        servicer.FetchKV,
        request_deserializer=worker_pb2.FetchKVRequest.FromString,
        response_serializer=_identity,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, capture.handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, capture.handlers)
    return servicer
