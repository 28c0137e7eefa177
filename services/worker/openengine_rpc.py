"""OpenEngine (`openengine.v1.Inference` / `openengine.v1.Control`, ai-dynamo/openengine) served by
the worker on tandem's own port: OpenEngine messages <-> tandem's worker messages, and nothing else.

A Generate call is translated into tandem's `worker_pb2.GenerateRequest` and run by the same code
as tandem's Generate (`WorkerServicer._generate`: admission, validation, grammars, deadlines, the
engine), so both protocols produce the same tokens and the same refusals. What OpenEngine asks for
and tandem does not do answers UNIMPLEMENTED naming the field, never silently (docs/protocols.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import grpc

import tandem
from openengine.v1 import (
    generation_pb2,
    kv_pb2,
    lifecycle_pb2,
    lora_pb2,
    model_pb2,
    openengine_pb2_grpc,
    server_pb2,
)
from services.worker import openengine_kv, openengine_session
from services.worker.kv_events import KvEventLog
from services.worker.rpc import WorkerServicer
from services.worker.stop_text import StopText
from tandem.v1 import common_pb2, worker_pb2

INFERENCE_SERVICE = "openengine.v1.Inference"
CONTROL_SERVICE = "openengine.v1.Control"
SCHEMA_REVISION = 1  # the wire revision of the vendored protos (openengine v0.1.0)
SCHEMA_RELEASE = "openengine@4def7c50b05e0674a0c3b26917399155535966e4"

_ROLES = {
    "unified": server_pb2.ENGINE_ROLE_AGGREGATED,
    "prefill": server_pb2.ENGINE_ROLE_PREFILL,
    "decode": server_pb2.ENGINE_ROLE_DECODE,
}
_FINISH = {
    common_pb2.FINISH_REASON_STOP: generation_pb2.FINISH_REASON_STOP,
    common_pb2.FINISH_REASON_LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    common_pb2.FINISH_REASON_ABORT: generation_pb2.FINISH_REASON_CANCELLED,
}
_GUIDED_MODES = [
    model_pb2.GUIDED_DECODING_MODE_JSON_SCHEMA,
    model_pb2.GUIDED_DECODING_MODE_REGEX,
    model_pb2.GUIDED_DECODING_MODE_EBNF_GRAMMAR,
    model_pb2.GUIDED_DECODING_MODE_CHOICE,
    model_pb2.GUIDED_DECODING_MODE_JSON_OBJECT,
]
# OpenEngine guide -> tandem GuidedDecoding field (ebnf_grammar: read as llguidance's Lark dialect)
_GUIDES = {"json_schema": "json_schema", "regex": "regex", "ebnf_grammar": "lark_grammar"}
_GUIDED_BACKENDS = ("", "llguidance")


class Unsupported(Exception):
    """A request field tandem does not implement: UNIMPLEMENTED, naming the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")


class Invalid(Exception):
    """A request field with a bad value: INVALID_ARGUMENT, naming the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")


def sampling_to_tandem(msg: generation_pb2.GenerateRequest) -> common_pb2.SamplingParams:
    """OpenEngine's sampling, stopping, response and guided options as tandem's SamplingParams:
    the one place OpenEngine's request options meet tandem's (raises Unsupported / Invalid)."""
    s, stop, resp = msg.sampling, msg.stopping, msg.response
    out = common_pb2.SamplingParams()
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    ):
        if s.HasField(name):
            setattr(out, name, getattr(s, name))
    if s.HasField("top_k"):
        out.top_k = s.top_k
    if s.HasField("seed"):
        out.seed = s.seed
    if s.HasField("num_sequences"):
        out.n = s.num_sequences
    if stop.HasField("max_tokens"):
        out.max_tokens = stop.max_tokens
    if stop.HasField("min_tokens"):
        out.min_tokens = stop.min_tokens
    out.ignore_eos = stop.ignore_eos
    for i, cond in enumerate(stop.conditions):
        kind = cond.WhichOneof("condition")
        if kind == "stop_token_id":
            out.stop_token_ids.append(cond.stop_token_id)
        elif kind == "stop_text":
            pass  # matched on the engine's output bytes by the servicer (stop_text.py)
        else:
            raise Invalid(f"stopping.conditions[{i}]", "set stop_text or stop_token_id")
    if stop.include_stop_in_output:
        raise Unsupported(
            "stopping.include_stop_in_output", "tandem always includes the stop token id in the output tokens"
        )
    if resp.return_output_logprobs or resp.HasField("output_candidates"):
        out.logprobs = _top_n(resp.output_candidates, "response.output_candidates")
    if resp.return_prompt_logprobs or resp.HasField("prompt_candidates"):
        out.prompt_logprobs = _top_n(resp.prompt_candidates, "response.prompt_candidates")
    if msg.HasField("guided"):
        _guided_to_tandem(msg.guided, out.guided)
    return out


def _top_n(sel: generation_pb2.CandidateTokenSelection, field: str) -> int:
    kind = sel.WhichOneof("selection")
    if kind is None:
        return 0
    if kind == "top_n":
        return sel.top_n
    raise Unsupported(f"{field}.{kind}", "tandem returns top-n candidates only; use top_n")


def _guided_to_tandem(g: generation_pb2.GuidedDecoding, out: common_pb2.GuidedDecoding) -> None:
    if g.backend not in _GUIDED_BACKENDS:
        raise Unsupported(
            "guided.backend", f"tandem's only guided-decoding backend is llguidance, not {g.backend!r}"
        )
    kind = g.WhichOneof("guide")
    if kind is None:
        raise Invalid("guided", "set one guide: json_schema, regex, ebnf_grammar, choice or json_object")
    if kind == "structural_tag":
        raise Unsupported("guided.structural_tag", "tandem has no structural-tag constraint")
    if kind == "choice":
        out.choice.values.extend(g.choice.choices)
    elif kind == "json_object":
        out.json_object = True
    else:
        setattr(out, _GUIDES[kind], getattr(g, kind))


def _check_unsupported(msg: generation_pb2.GenerateRequest) -> None:
    if msg.media:
        raise Unsupported("media", "tandem workers take text models only (no multimodal input)")
    if msg.lora_name:
        raise Unsupported("lora_name", "tandem workers serve no LoRA adapters")
    if msg.HasField("kv"):
        if msg.kv.bypass_prefix_cache:
            raise Unsupported(
                "kv.bypass_prefix_cache", "tandem's prefix cache cannot be bypassed per request"
            )
        if msg.kv.HasField("cache_salt"):
            raise Unsupported("kv.cache_salt", "tandem's prefix cache has no per-request salt")
    if msg.HasField("extra") and msg.extra.fields:
        raise Unsupported(
            "extra", f"tandem takes no engine-specific fields ({', '.join(sorted(msg.extra.fields))})"
        )
    if msg.response.prompt_logprob_start:
        raise Unsupported(
            "response.prompt_logprob_start", "tandem returns prompt logprobs from the first token"
        )


def _token_info(lp: common_pb2.TokenLogprob) -> generation_pb2.TokenInfo:
    return generation_pb2.TokenInfo(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        candidates=[generation_pb2.LogProb(token_id=t.token_id, logprob=t.logprob) for t in lp.top_logprobs],
    )


class OpenEngineServicer(openengine_pb2_grpc.InferenceServicer, openengine_pb2_grpc.ControlServicer):
    """Both OpenEngine services over one tandem WorkerServicer (its engine, admission and limits)."""

    def __init__(self, worker: WorkerServicer, instance_id: str = "") -> None:
        self.worker = worker
        self.async_engine = worker.async_engine
        self.engine = worker.engine
        self.instance_id = instance_id
        self.draining = False  # set by the server's drain (main.py): Health answers DRAINING

    # ---- Inference ---------------------------------------------------------------------------
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if self.engine.config.role == "prefill" and request.kv.HasField("session"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "kv.session: this is a prefill worker (--role prefill); send the session to a decode worker",
            )
        try:
            tandem_req = self._to_tandem(request)
        except Unsupported as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        except Invalid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.model and request.model != self.engine.served_model_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model: this worker serves {self.engine.served_model_name!r}, not {request.model!r}",
            )
        if self.engine.config.role == "prefill":
            async for event in self._prefill(request, tandem_req, context):
                yield event
            return
        try:
            stop_text = self._stop_text(request)
        except Unsupported as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        stop_ids = set(tandem_req.sampling.stop_token_ids)
        prompt = list(tandem_req.prompt_token_ids)
        num_output = 0
        await self.worker._refuse_when_full(context)
        with self.worker._admit():
            # aclosing: leaving early (a stop string matched) aborts the engine request now
            generated = cast(
                AsyncGenerator[worker_pb2.GenerateResponse], self.worker._generate(tandem_req, context)
            )
            async with contextlib.aclosing(generated) as chunks:
                async for chunk in chunks:
                    if chunk.prompt_logprobs:
                        # tandem has no logprob for the first prompt token: it comes without one
                        tokens = [generation_pb2.TokenInfo(token_id=prompt[0])]
                        tokens += [_token_info(lp) for lp in chunk.prompt_logprobs]
                        yield generation_pb2.GenerateResponse(
                            request_id=request.request_id, prompt=generation_pb2.PromptOutput(tokens=tokens)
                        )
                    for i, delta in enumerate(chunk.choices):
                        new_ids, new_lps = list(delta.token_ids), list(delta.logprobs)
                        matched = None
                        if stop_text is not None:
                            keep, matched = stop_text.feed(new_ids)
                            new_ids, new_lps = new_ids[:keep], new_lps[:keep]
                        num_output += len(new_ids)
                        if new_ids:
                            if new_lps:
                                tokens = [_token_info(lp) for lp in new_lps]
                            else:
                                tokens = [generation_pb2.TokenInfo(token_id=t) for t in new_ids]
                            yield generation_pb2.GenerateResponse(
                                request_id=request.request_id,
                                token=generation_pb2.TokenOutput(output_index=delta.index, tokens=tokens),
                            )
                        if matched is not None:  # one choice only (_stop_text): the request is done
                            done = generation_pb2.GenerationFinished(
                                output_index=delta.index, reason=generation_pb2.FINISH_REASON_STOP
                            )
                            done.stop_match.stop_text = matched
                            usage = generation_pb2.Usage(
                                prompt_tokens=len(prompt),
                                completion_tokens=num_output,
                                total_tokens=len(prompt) + num_output,
                            )
                            yield generation_pb2.GenerateResponse(
                                request_id=request.request_id, finished=done, usage=usage
                            )
                            return
                        if delta.finish_reason:
                            last = chunk.HasField("usage") and i == len(chunk.choices) - 1
                            yield self._finished(
                                request.request_id, delta, stop_ids, chunk.usage if last else None
                            )

    async def _prefill(
        self,
        request: generation_pb2.GenerateRequest,
        tandem_req: worker_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """A prefill worker's answer (openengine_session.py): tandem's Prefill, its first token,
        then PrefillReady naming the KV handle (or `finished` when the first token ended it)."""
        if request.sampling.num_sequences > 1:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "sampling.num_sequences: a prefill hands off one sequence"
            )
        if any(c.WhichOneof("condition") == "stop_text" for c in request.stopping.conditions):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "stopping.conditions.stop_text: send stop strings with the decode request",
            )
        prefill = worker_pb2.PrefillRequest(
            request_id=tandem_req.request_id,
            prompt_token_ids=tandem_req.prompt_token_ids,
            sampling=tandem_req.sampling,
        )
        reply = await self.worker.Prefill(prefill, context)  # admission, validation, the engine
        rid, first = request.request_id, reply.first
        if reply.prompt_logprobs:
            tokens = [generation_pb2.TokenInfo(token_id=prefill.prompt_token_ids[0])]
            tokens += [_token_info(lp) for lp in reply.prompt_logprobs]
            yield generation_pb2.GenerateResponse(
                request_id=rid, prompt=generation_pb2.PromptOutput(tokens=tokens)
            )
        if first.logprobs:
            tokens = [_token_info(lp) for lp in first.logprobs]
        else:
            tokens = [generation_pb2.TokenInfo(token_id=t) for t in first.token_ids]
        yield generation_pb2.GenerateResponse(
            request_id=rid, token=generation_pb2.TokenOutput(output_index=0, tokens=tokens)
        )
        if first.finish_reason:  # done at its first token: nothing to hand off
            yield self._finished(rid, first, set(prefill.sampling.stop_token_ids), reply.usage)
            return
        usage = generation_pb2.Usage(
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
            total_tokens=reply.usage.prompt_tokens + reply.usage.completion_tokens,
            cached_prompt_tokens=reply.usage.cached_prompt_tokens,
        )
        ready = generation_pb2.PrefillReady(
            kv_session=openengine_session.session_ref(reply.handle, list(first.token_ids))
        )
        yield generation_pb2.GenerateResponse(request_id=rid, prefill_ready=ready, usage=usage)

    def _stop_text(self, msg: generation_pb2.GenerateRequest) -> StopText | None:
        """Stop strings, matched here on the worker tokenizer's bytes (stop_text.py)."""
        stops = [c.stop_text for c in msg.stopping.conditions if c.WhichOneof("condition") == "stop_text"]
        if not stops:
            return None
        if self.engine.grammars is None:
            raise Unsupported(
                "stopping.conditions.stop_text",
                "stop strings need the worker's tokenizer (see `tandem worker --tokenizer`); send stop_token_id",
            )
        if msg.sampling.num_sequences > 1:
            raise Unsupported(
                "stopping.conditions.stop_text", "stop strings with num_sequences > 1: one request each"
            )
        return StopText(self.engine.grammars.tokenizer, stops)

    def _to_tandem(self, msg: generation_pb2.GenerateRequest) -> worker_pb2.GenerateRequest:
        _check_unsupported(msg)
        kind = msg.WhichOneof("input")
        if kind is None:
            raise Invalid("input", "set prompt or token_ids")
        if kind == "prompt":
            grammars = self.engine.grammars
            if grammars is None:
                raise Unsupported(
                    "prompt", "this worker has no tokenizer (see `tandem worker --tokenizer`); send token_ids"
                )
            token_ids = list(grammars.tokenizer.tokenize_str(msg.prompt))
        else:
            token_ids = list(msg.token_ids.ids)
        out = worker_pb2.GenerateRequest(
            request_id=msg.request_id, prompt_token_ids=token_ids, sampling=sampling_to_tandem(msg)
        )
        if msg.kv.HasField("session"):  # a decode: pull the prompt's KV from the prefill worker
            try:
                handle, generated = openengine_session.kv_source(msg.kv.session)
            except openengine_session.SessionError as exc:
                field, _, why = str(exc).partition(": ")
                raise (Unsupported if exc.unsupported else Invalid)(field, why) from None
            out.kv_source.CopyFrom(handle)
            out.generated_token_ids.extend(generated)
        return out

    def _finished(
        self,
        request_id: str,
        delta: worker_pb2.ChoiceDelta,
        stop_ids: set[int],
        usage: common_pb2.Usage | None,
    ) -> generation_pb2.GenerateResponse:
        done = generation_pb2.GenerationFinished(
            output_index=delta.index, reason=_FINISH[delta.finish_reason]
        )
        if delta.HasField("stop_token_id"):
            if delta.stop_token_id in stop_ids:
                done.stop_match.stop_token_id = delta.stop_token_id
            else:
                done.stop_match.eos_token_id = delta.stop_token_id
        reply = generation_pb2.GenerateResponse(request_id=request_id, finished=done)
        if usage is not None:
            reply.usage.CopyFrom(
                generation_pb2.Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    total_tokens=usage.prompt_tokens + usage.completion_tokens,
                    cached_prompt_tokens=usage.cached_prompt_tokens,
                )
            )
        return reply

    # ---- Control -----------------------------------------------------------------------------
    async def GetServerInfo(
        self, request: server_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> server_pb2.ServerInfo:
        e = self.engine
        return server_pb2.ServerInfo(
            engine_name="tandem",
            engine_version=tandem.__version__,
            engine_role=_ROLES[e.config.role],
            instance_id=self.instance_id,
            supported_models=[e.served_model_name],
            parallelism=server_pb2.ParallelismInfo(
                tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1, data_parallel_rank=0
            ),
            kv_connector=self._kv_connector(),
            schema_revision=SCHEMA_REVISION,
            minimum_client_revision=SCHEMA_REVISION,
            schema_release=SCHEMA_RELEASE,
            capacity=server_pb2.DeploymentCapacity(
                kv_block_size=e.config.block_size,
                total_kv_blocks=e.block_manager.num_blocks,
                max_running_requests=e.config.max_num_seqs,
                max_loras=0,
            ),
        )

    def _kv_connector(self) -> kv_pb2.KvConnectorInfo:
        """tandem's hand-off: prefill workers hold KV under a session, decode workers pull it (FetchKV)."""
        role = self.engine.config.role
        if role == "unified":
            return kv_pb2.KvConnectorInfo(enabled=False)
        address = self.worker.advertise_address or self.instance_id
        return kv_pb2.KvConnectorInfo(
            enabled=True,
            transfer_backend=openengine_session.TRANSFER_BACKEND,
            local_endpoints=[openengine_kv.endpoint(address)] if address else [],
            supported_protocols=["grpc"],
            supports_remote_prefill=role == "decode",
            supports_decode_pull=True,
            supports_abort_cleanup=role == "prefill",
            schema_version=openengine_kv.SCHEMA_VERSION,
        )

    async def GetModelInfo(
        self, request: model_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ModelInfo:
        e = self.engine
        if request.model and request.model != e.served_model_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model: this worker serves {e.served_model_name!r}, not {request.model!r}",
            )
        top_n = [model_pb2.CANDIDATE_TOKEN_SELECTION_MODE_TOP_N]
        guided = e.grammars is not None
        return model_pb2.ModelInfo(
            model_id=e.served_model_name,
            served_model_name=e.served_model_name,
            max_context_length=e.max_model_len,
            max_output_tokens=e.max_model_len,
            supports_text_input=guided,  # the tokenizer that guided decoding loads
            supports_token_ids_input=True,
            generation=model_pb2.GenerationCapabilities(
                prompt_logprobs=model_pb2.LogprobCapabilities(
                    supported=True, candidate_selection_modes=top_n
                ),
                output_logprobs=model_pb2.LogprobCapabilities(
                    supported=True, candidate_selection_modes=top_n
                ),
                guided_decoding=model_pb2.GuidedDecodingCapabilities(
                    supported=guided, modes=_GUIDED_MODES if guided else []
                ),
                supports_priority=False,
                supports_stop_in_output=False,
                supports_cache_salt=False,
                supports_prefix_cache_bypass=False,
            ),
            supports_lora=False,
            supports_multimodal=False,
        )

    async def GetLoad(
        self, request: server_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> server_pb2.LoadInfo:
        load = self.async_engine.load
        return server_pb2.LoadInfo(
            instance_id=self.instance_id,
            timestamp_unix_nanos=time.time_ns(),
            running_requests=load.num_running,
            queued_requests=load.num_waiting,
            active_kv_sessions=len(self.engine.kv_handles),
            used_kv_blocks=load.num_kv_blocks_used,
            total_kv_blocks=load.num_kv_blocks_total,
            waiting_tokens=load.num_waiting_tokens,
        )

    async def Health(
        self, request: lifecycle_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> lifecycle_pb2.HealthResponse:
        if request.include_inference_probe:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "include_inference_probe: tandem reports readiness without a probe generation",
            )
        if request.model and request.model != self.engine.served_model_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model: this worker serves {self.engine.served_model_name!r}, not {request.model!r}",
            )
        role = _ROLES[self.engine.config.role]
        role_ok = request.role in (server_pb2.ENGINE_ROLE_UNSPECIFIED, role)
        state = lifecycle_pb2.HEALTH_STATE_DRAINING if self.draining else lifecycle_pb2.HEALTH_STATE_READY
        checks = [lifecycle_pb2.HealthCheck(name="grpc", state=state)]
        if not role_ok:
            state = lifecycle_pb2.HEALTH_STATE_NOT_READY
            checks.append(
                lifecycle_pb2.HealthCheck(
                    name="role", state=state, message=f"this worker's role is {self.engine.config.role}"
                )
            )
        return lifecycle_pb2.HealthResponse(state=state, checks=checks)

    async def Abort(
        self, request: lifecycle_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> lifecycle_pb2.AbortResponse:
        target = request.WhichOneof("target")
        if target == "kv_session":  # free the KV a prefill here holds for that session
            store, handle_id = self.engine.kv_handles, request.kv_session.session_id
            if await self.async_engine.call(lambda: store.release(handle_id, only_idle=True)):
                return lifecycle_pb2.AbortResponse(
                    status=lifecycle_pb2.ABORT_STATUS_ABORTED, message=f"released the KV of {handle_id}"
                )
            return lifecycle_pb2.AbortResponse(
                status=lifecycle_pb2.ABORT_STATUS_ALREADY_FINISHED,
                message="this worker holds no KV for that session (fetched, expired or never here)",
            )
        if target is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target: set request_id or all_requests")
        if target == "request_id":
            ids = [request.request_id]
        else:  # the engine thread owns the table of live requests: read it there
            ids = await self.async_engine.call(lambda: list(self.async_engine._streams))
        num = await self.async_engine.abort(ids)
        if num:
            return lifecycle_pb2.AbortResponse(
                status=lifecycle_pb2.ABORT_STATUS_ABORTED, message=f"aborted {num}"
            )
        return lifecycle_pb2.AbortResponse(
            status=lifecycle_pb2.ABORT_STATUS_ALREADY_FINISHED, message="no such request is running"
        )

    async def LoadLora(
        self, request: lora_pb2.LoadLoraRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.LoadLoraResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "LoadLora: tandem workers serve no LoRA adapters")
        raise AssertionError  # unreachable: abort raises

    async def UnloadLora(
        self, request: lora_pb2.UnloadLoraRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.UnloadLoraResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "UnloadLora: tandem workers serve no LoRA adapters"
        )
        raise AssertionError

    async def ListLoras(
        self, request: lora_pb2.ListLorasRequest, context: grpc.aio.ServicerContext
    ) -> lora_pb2.ListLorasResponse:
        return lora_pb2.ListLorasResponse()  # none loaded: tandem has no LoRA support

    async def GetKvEventSources(
        self, request: kv_pb2.GetKvEventSourcesRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.GetKvEventSourcesResponse:
        events = await self._kv_events(list(request.data_parallel_ranks), context)
        address = self.worker.advertise_address or self.instance_id
        return kv_pb2.GetKvEventSourcesResponse(
            sources=[openengine_kv.event_source(address, events.capacity)]
        )

    async def SubscribeKvEvents(
        self, request: kv_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.SubscribeKvEventsResponse]:
        events = await self._kv_events(list(request.data_parallel_ranks), context)
        async for reply in openengine_kv.subscribe(events, self.engine.config.block_size, request, context):
            yield reply

    async def _kv_events(self, ranks: list[int], context: grpc.aio.ServicerContext) -> KvEventLog:
        """The worker's prefix-cache change log; FAILED_PRECONDITION without prefix caching."""
        try:
            openengine_kv.check_ranks(ranks)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.engine.kv_events is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this worker runs without prefix caching: no KV events"
            )
        assert self.engine.kv_events is not None
        return self.engine.kv_events


def add_to_server(
    server: grpc.aio.Server, worker: WorkerServicer, instance_id: str = ""
) -> OpenEngineServicer:
    servicer = OpenEngineServicer(worker, instance_id)
    openengine_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    openengine_pb2_grpc.add_ControlServicer_to_server(servicer, server)
    return servicer
