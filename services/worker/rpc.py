"""The tandem.v1.Worker gRPC servicer: protobuf <-> engine dataclasses, and nothing else.

This is the only worker module that imports the generated `worker_pb2` / `common_pb2`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc

import tandem
from services.common import metrics, telemetry
from services.common.logging import request_id_var
from services.worker.async_engine import AsyncEngine
from services.worker.engine import Engine
from services.worker.kv_cache import KV_LAYOUT
from services.worker.outputs import RequestOutput
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
_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def sampling_from_pb(sp: common_pb2.SamplingParams) -> SamplingParams:
    def opt(name: str, default: float) -> float:
        return float(getattr(sp, name)) if sp.HasField(name) else default

    return SamplingParams(
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=int(sp.top_k) if sp.HasField("top_k") else 0,
        min_p=opt("min_p", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        seed=int(sp.seed) if sp.HasField("seed") else None,
        max_tokens=int(sp.max_tokens) if sp.HasField("max_tokens") else None,
        min_tokens=int(sp.min_tokens),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        n=int(sp.n) if sp.HasField("n") else 1,
        logprobs=int(sp.logprobs) if sp.HasField("logprobs") else None,
        prompt_logprobs=int(sp.prompt_logprobs) if sp.HasField("prompt_logprobs") else None,
    )


def request_from_pb(msg: worker_pb2.GenerateRequest) -> EngineRequest:
    return EngineRequest(
        request_id=msg.request_id,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        sampling=sampling_from_pb(msg.sampling),
        generated_token_ids=tuple(msg.generated_token_ids),
        first_choice_index=msg.first_choice_index,
    )


def logprob_to_pb(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def output_to_pb(out: RequestOutput) -> worker_pb2.GenerateResponse:
    msg = worker_pb2.GenerateResponse(request_id=out.request_id)
    for choice in out.choices:
        delta = msg.choices.add(index=choice.index, token_ids=choice.token_ids)
        if choice.logprobs is not None:
            delta.logprobs.extend(logprob_to_pb(lp) for lp in choice.logprobs)
        if choice.finish_reason is not None:
            delta.finish_reason = _FINISH[choice.finish_reason]
        if choice.stop_token_id is not None:
            delta.stop_token_id = choice.stop_token_id
    if out.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(logprob_to_pb(lp) for lp in out.prompt_logprobs)
    if out.usage is not None:
        msg.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.usage.prompt_tokens,
                completion_tokens=out.usage.completion_tokens,
                cached_prompt_tokens=out.usage.cached_prompt_tokens,
            )
        )
    return msg


def fingerprint(engine: Engine) -> str:
    cfg = engine.model_config
    parts = [cfg.architecture, engine.served_model_name, str(engine.dtype), str(engine.config.block_size)]
    parts += [str(cfg.num_layers), str(cfg.num_kv_heads), str(cfg.head_dim), KV_LAYOUT]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _check_floats(sp: common_pb2.SamplingParams) -> None:
    """NaN must be refused before any comparison treats it as in range."""
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if sp.HasField(name) and not math.isfinite(getattr(sp, name)):
            raise InvalidRequestError(f"sampling.{name}", f"must be a finite number, got {getattr(sp, name)}")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine) -> None:
        self.async_engine = engine
        self.engine = engine.engine
        _export_load_gauges(engine)

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        request_id_var.set(request.request_id or "-")
        try:
            _check_floats(request.sampling)
            req = request_from_pb(request)
            validate_request(req, self.engine.model_config.vocab_size, self.engine.max_model_len)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Expired before it started: drop it. A deadline passing later cancels this rpc, and
            # the `finally` below aborts the request, which frees its KV blocks.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline has passed")
        arrival = time.monotonic()
        trace_parent = telemetry.capture_context()  # the rpc span: parent of the engine-phase spans
        first_token: float | None = None
        outputs = self.async_engine.submit(req)
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, InvalidRequestError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                assert isinstance(item, RequestOutput)
                if first_token is None and any(c.token_ids for c in item.choices):
                    first_token = time.monotonic()
                finished = item.finished
                if finished and item.usage is not None:
                    _observe_finished(
                        req.request_id, item, arrival, first_token, self.async_engine, trace_parent
                    )
                yield output_to_pb(item)
        finally:
            self.async_engine.scheduled_at.pop(req.request_id, None)
            if not finished:  # the client went away (or we failed): free the request's blocks now
                self.async_engine.abort_nowait(req.request_id)

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
            role=worker_pb2.WORKER_ROLE_UNIFIED,
            kv_layout=worker_pb2.KVLayout(
                num_layers=cfg.num_layers,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                block_size=e.config.block_size,
                dtype=dtype,
                layout=KV_LAYOUT,
            ),
            vocab_size=cfg.vocab_size,
            eos_token_ids=cfg.eos_token_ids,
            tensor_parallel_size=1,
            device=device,
            fingerprint=fingerprint(e),
            num_kv_blocks=e.block_manager.num_blocks,
            max_num_seqs=e.config.max_num_seqs,
            version=tandem.__version__,
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
            num_kv_handles=0,
        )

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "disaggregation is not implemented yet")
        raise AssertionError("unreachable")

    async def FetchKV(
        self, request: worker_pb2.FetchKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KVChunk]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "disaggregation is not implemented yet")
        yield worker_pb2.KVChunk()  # pragma: no cover - makes this an async generator

    async def ReleaseKV(
        self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKVResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "disaggregation is not implemented yet")
        raise AssertionError("unreachable")


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


def add_to_server(server: grpc.aio.Server, engine: AsyncEngine) -> None:
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine), server)
