"""SMG's `vllm.grpc.engine.VllmEngine` (lightseekorg/smg `vllm_engine.proto`, what SMG's gRPC mode
and llm-d's vLLM-gRPC parser call) served by the worker on tandem's own port.

Like OpenEngine (openengine_rpc.py), a Generate is translated into tandem's own GenerateRequest
and run by `WorkerServicer._generate`, so the tokens, limits and refusals are tandem's. What the
proto asks for and tandem does not do answers UNIMPLEMENTED naming the field (docs/protocols.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import time
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import grpc

from services.worker.openengine_rpc import Invalid, Unsupported
from services.worker.rpc import WorkerServicer
from services.worker.stop_text import StopText
from tandem.smg import common_pb2 as smg_common_pb2
from tandem.smg import vllm_engine_pb2 as pb
from tandem.smg import vllm_engine_pb2_grpc
from tandem.v1 import common_pb2, worker_pb2

SERVICE_NAME = "vllm.grpc.engine.VllmEngine"
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}
# GetTokenizer: what a router needs to tokenize and render for this model (besides tokenizer*)
TOKENIZER_FILES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "config.json",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
}
TOKENIZER_CHUNK_BYTES = 1 << 20
_GUIDES = {"json_schema": "json_schema", "regex": "regex", "grammar": "lark_grammar"}


def sampling_to_tandem(sp: pb.SamplingParams) -> common_pb2.SamplingParams:
    """SMG's SamplingParams as tandem's (raises Unsupported / Invalid). Its plain (non-optional)
    floats are 0 when unset: 0 reads as the neutral value where 0 is not a valid setting."""
    out = common_pb2.SamplingParams()
    if sp.HasField("temperature"):
        out.temperature = sp.temperature
    if sp.top_p:
        out.top_p = sp.top_p
    if sp.top_k:
        if sp.top_k >= 2**31:
            raise Invalid("sampling_params.top_k", f"must be below 2^31, got {sp.top_k}")
        out.top_k = sp.top_k
    if sp.min_p:
        out.min_p = sp.min_p
    if sp.frequency_penalty:
        out.frequency_penalty = sp.frequency_penalty
    if sp.presence_penalty:
        out.presence_penalty = sp.presence_penalty
    if sp.repetition_penalty:
        out.repetition_penalty = sp.repetition_penalty
    if sp.HasField("max_tokens"):
        out.max_tokens = sp.max_tokens
    out.min_tokens = sp.min_tokens
    if sp.include_stop_str_in_output:
        raise Unsupported(
            "sampling_params.include_stop_str_in_output", "tandem workers match no stop strings"
        )
    out.stop_token_ids.extend(sp.stop_token_ids)
    out.ignore_eos = sp.ignore_eos
    if sp.n:
        out.n = sp.n
    if sp.HasField("logprobs"):
        if sp.logprobs < 0:
            raise Unsupported("sampling_params.logprobs", "tandem returns top-n logprobs, not all (-1)")
        out.logprobs = sp.logprobs
    if sp.HasField("prompt_logprobs"):
        if sp.prompt_logprobs < 0:
            raise Unsupported(
                "sampling_params.prompt_logprobs", "tandem returns top-n logprobs, not all (-1)"
            )
        out.prompt_logprobs = sp.prompt_logprobs
    if sp.HasField("seed"):
        if sp.seed < 0:
            raise Invalid("sampling_params.seed", f"must be >= 0, got {sp.seed}")
        out.seed = sp.seed
    if any(t < 0 for t in sp.logit_bias):  # the engine checks the rest (validate_sampling)
        raise Invalid("sampling_params.logit_bias", "keys must be token ids (>= 0)")
    out.logit_bias.update(sp.logit_bias)
    if sp.HasField("truncate_prompt_tokens"):
        raise Unsupported("sampling_params.truncate_prompt_tokens", "tandem does not truncate prompts")
    kind = sp.WhichOneof("constraint")
    if kind == "structural_tag":
        raise Unsupported("sampling_params.structural_tag", "tandem has no structural-tag constraint")
    if kind == "json_object":
        out.guided.json_object = sp.json_object
    elif kind == "choice":
        out.guided.choice.values.extend(sp.choice.choices)
    elif kind is not None:
        setattr(out.guided, _GUIDES[kind], getattr(sp, kind))
    return out


def _check_unsupported(msg: pb.GenerateRequest) -> None:
    if msg.HasField("mm_inputs"):
        raise Unsupported("mm_inputs", "tandem workers take text models only")
    if msg.HasField("kv_transfer_params") or msg.HasField("kv_transfer_params_json"):
        raise Unsupported("kv_transfer_params", "tandem's KV hand-off is on tandem's proto (kv_source)")
    if msg.HasField("data_parallel_rank") and msg.data_parallel_rank != 0:
        raise Invalid(
            "data_parallel_rank", f"this worker has one data-parallel rank (0), not {msg.data_parallel_rank}"
        )


def _output_logprobs(deltas: list[common_pb2.TokenLogprob]) -> pb.OutputLogProbs:
    return pb.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in deltas],
        token_ids=[lp.token_id for lp in deltas],
        top_logprobs=[
            pb.TopLogProbs(
                values=[t.logprob for t in lp.top_logprobs], token_ids=[t.token_id for t in lp.top_logprobs]
            )
            for lp in deltas
        ],
    )


def _absolute(path: str) -> str:
    """A local path made absolute (the router runs elsewhere); a hub id stays as it is."""
    local = Path(path)
    return str(local.resolve()) if local.exists() else path


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith(".jinja") or name.startswith("tokenizer")


def _zip(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, path.name)
    return buffer.getvalue()


class _Choice:
    """What one choice produced so far (GenerateComplete carries all of it)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []


class VllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(self, worker: WorkerServicer) -> None:
        self.worker = worker
        self.async_engine = worker.async_engine
        self.engine = worker.engine
        self.started = time.monotonic()
        self.draining = False  # set by the server's drain (main.py): HealthCheck says unhealthy

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            _check_unsupported(request)
            kind = request.WhichOneof("input")
            if kind is None:
                raise Invalid("input", "set tokenized or text")
            if kind == "text":
                grammars = self.engine.grammars
                if grammars is None:
                    raise Unsupported(
                        "text",
                        "this worker has no tokenizer (see `tandem worker --tokenizer`); send tokenized",
                    )
                token_ids = list(grammars.tokenizer.tokenize_str(request.text))
            else:
                token_ids = list(request.tokenized.input_ids)
            sampling = sampling_to_tandem(request.sampling_params)
            stop_text = self._stop_text(request.sampling_params)
        except Unsupported as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        except Invalid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tandem_req = worker_pb2.GenerateRequest(
            request_id=request.request_id, prompt_token_ids=token_ids, sampling=sampling
        )
        choices: dict[int, _Choice] = {}
        prompt_lp: pb.InputLogProbs | None = None
        num_prompt = len(token_ids)
        await self.worker._refuse_when_full(context)
        with self.worker._admit():
            # aclosing: leaving early (a stop string matched) aborts the engine request now
            generated = cast(
                AsyncGenerator[worker_pb2.GenerateResponse], self.worker._generate(tandem_req, context)
            )
            async with contextlib.aclosing(generated) as chunks:
                async for chunk in chunks:
                    if chunk.prompt_logprobs:
                        entries = [pb.InputTokenLogProb()]  # the first prompt token has none
                        entries += [pb.InputTokenLogProb(value=lp.logprob) for lp in chunk.prompt_logprobs]
                        tops = [pb.TopLogProbs()]
                        tops += [
                            pb.TopLogProbs(
                                values=[t.logprob for t in lp.top_logprobs],
                                token_ids=[t.token_id for t in lp.top_logprobs],
                            )
                            for lp in chunk.prompt_logprobs
                        ]
                        prompt_lp = pb.InputLogProbs(
                            token_logprobs=entries, token_ids=token_ids, top_logprobs=tops
                        )
                    cached = chunk.usage.cached_prompt_tokens if chunk.HasField("usage") else 0
                    for delta in chunk.choices:
                        c = choices.setdefault(delta.index, _Choice())
                        new_ids, new_lps = list(delta.token_ids), list(delta.logprobs)
                        matched = None
                        if stop_text is not None:
                            keep, matched = stop_text.feed(new_ids)
                            new_ids, new_lps = new_ids[:keep], new_lps[:keep]
                        c.token_ids.extend(new_ids)
                        c.logprobs.extend(new_lps)
                        if request.stream and new_ids:
                            out = pb.GenerateStreamChunk(
                                token_ids=new_ids,
                                prompt_tokens=num_prompt,
                                completion_tokens=len(c.token_ids),
                                index=delta.index,
                            )
                            if new_lps:
                                out.output_logprobs.CopyFrom(_output_logprobs(new_lps))
                            if prompt_lp is not None:
                                out.input_logprobs.CopyFrom(prompt_lp)
                                prompt_lp = None
                            yield pb.GenerateResponse(chunk=out)
                        if delta.finish_reason or matched is not None:
                            done = pb.GenerateComplete(
                                output_ids=[] if request.stream else c.token_ids,  # streamed already
                                finish_reason="stop" if matched is not None else _FINISH[delta.finish_reason],
                                prompt_tokens=num_prompt,
                                completion_tokens=len(c.token_ids),
                                cached_tokens=cached,
                                index=delta.index,
                            )
                            if c.logprobs and not request.stream:
                                done.output_logprobs.CopyFrom(_output_logprobs(c.logprobs))
                            if prompt_lp is not None:
                                done.input_logprobs.CopyFrom(prompt_lp)
                            if matched is not None:
                                done.matched_stop_str = matched
                            elif delta.HasField("stop_token_id"):
                                done.matched_token_id = delta.stop_token_id
                            yield pb.GenerateResponse(complete=done)
                            if matched is not None:
                                return  # one choice only (_stop_text): the request is done

    def _stop_text(self, sp: pb.SamplingParams) -> StopText | None:
        """Stop strings, matched here on the worker tokenizer's bytes (stop_text.py)."""
        if not sp.stop:
            return None
        if self.engine.grammars is None:
            raise Unsupported(
                "sampling_params.stop",
                "stop strings need the worker's tokenizer (see `tandem worker --tokenizer`)",
            )
        if sp.n > 1:
            raise Unsupported("sampling_params.stop", "stop strings with n > 1: one request per choice")
        return StopText(self.engine.grammars.tokenizer, list(sp.stop))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "Embed: tandem workers serve generation models only"
        )
        raise AssertionError  # unreachable: abort raises

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        if self.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining")
        return pb.HealthCheckResponse(healthy=True, message="ok")

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self.async_engine.abort(list(request.request_ids))
        return pb.AbortResponse()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        e = self.engine
        cfg = e.model_config
        return pb.GetModelInfoResponse(
            model_path=_absolute(e.config.model),  # SMG loads the tokenizer from here
            is_generation=True,
            max_context_length=e.max_model_len,
            vocab_size=cfg.vocab_size,
            supports_vision=False,
            served_model_name=e.served_model_name,
            tokenizer_path=_absolute(e.config.tokenizer or e.config.model),
            architectures=[cfg.architecture],
            eos_token_ids=list(cfg.eos_token_ids),
            max_req_input_len=e.max_model_len,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        load = self.async_engine.load
        return pb.GetServerInfoResponse(
            active_requests=load.num_running + load.num_waiting,
            is_paused=self.draining,
            uptime_seconds=time.monotonic() - self.started,
            server_type="tandem-grpc",
            data_parallel_size=1,
        )

    async def GetLoads(
        self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadsResponse:
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dp_rank: this worker has rank 0 only, not {request.dp_rank}",
            )
        load = self.async_engine.load
        block_size = self.engine.config.block_size
        total = load.num_kv_blocks_total * block_size
        return pb.GetLoadsResponse(
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            dp_rank_count=1,
            loads=[
                pb.SchedulerLoad(
                    dp_rank=0,
                    num_running_reqs=load.num_running,
                    num_waiting_reqs=load.num_waiting,
                    num_total_reqs=load.num_running + load.num_waiting,
                    num_used_tokens=load.num_kv_blocks_used * block_size,
                    max_total_num_tokens=total,
                    token_usage=load.num_kv_blocks_used / max(load.num_kv_blocks_total, 1),
                    cache_hit_rate=load.prefix_cache_hit_rate,
                    max_running_requests=self.engine.config.max_num_seqs,
                )
            ],
        )

    async def GetTokenizer(
        self, request: smg_common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[smg_common_pb2.GetTokenizerChunk]:
        """The model directory's tokenizer files as one zip, in chunks; sha256 on the last."""
        folder = Path(self.engine.config.tokenizer or self.engine.config.model)
        folder = folder if folder.is_dir() else folder.parent
        files = sorted(p for p in folder.iterdir() if p.is_file() and _is_tokenizer_file(p.name))
        if not any(p.name == "tokenizer.json" for p in files):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"GetTokenizer: no tokenizer.json in {_absolute(str(folder))}",
            )
        data = await asyncio.to_thread(_zip, files)
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            yield smg_common_pb2.GetTokenizerChunk(data=data[start : start + TOKENIZER_CHUNK_BYTES])
        yield smg_common_pb2.GetTokenizerChunk(sha256=hashlib.sha256(data).hexdigest())

    async def SubscribeKvEvents(
        self, request: smg_common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[smg_common_pb2.KvEventBatch]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "SubscribeKvEvents: tandem workers publish no KV events yet"
        )
        yield smg_common_pb2.KvEventBatch()  # unreachable


def add_to_server(server: grpc.aio.Server, worker: WorkerServicer) -> VllmEngineServicer:
    servicer = VllmEngineServicer(worker)
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
    return servicer
