"""A worker reached over SMG's `vllm.grpc.engine.VllmEngine` (`--worker smg:HOST:PORT`): vLLM's
gRPC server (`vllm serve --grpc`, smg-grpc-servicer) or a tandem worker, behind tandem's gateway.

`SmgWorkerClient` presents the interface of `clients.WorkerClient`, like `OpenEngineWorkerClient`,
and is the only gateway module that imports `tandem.smg`. Disaggregation and resuming a request
of several choices are refused with UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gateway.deadline import time_left
from gateway.downstream import (
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
from gateway.openengine_client import unimplemented
from services.common.channels import make_channel
from services.common.sampling import SamplingParams, resumed
from tandem.smg import vllm_engine_pb2 as pb
from tandem.smg import vllm_engine_pb2_grpc

PREFIX = "smg:"
_GUIDES = {"json_schema": "json_schema", "regex": "regex", "lark_grammar": "grammar"}


def sampling_to_smg(s: SamplingParams[Guided]) -> pb.SamplingParams:
    out = pb.SamplingParams(
        min_tokens=s.min_tokens, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, n=s.n
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"):
        value = getattr(s, name)
        if value is not None:
            setattr(out, name, value)
    if s.frequency_penalty is not None:
        out.frequency_penalty = s.frequency_penalty
    for name in ("max_tokens", "logprobs", "prompt_logprobs"):
        value = getattr(s, name)
        if value is not None:
            setattr(out, name, value)
    out.logit_bias.update(dict(s.logit_bias))
    if s.seed is not None:
        if s.seed >= 2**31:
            raise unimplemented(f"seed: SMG's proto carries int32 seeds, not {s.seed}")
        out.seed = s.seed
    g = s.guided
    if g is not None:
        if g.kind == "json_object":
            out.json_object = True
        elif g.kind == "choice":
            out.choice.choices.extend(g.choices)
        else:
            setattr(out, _GUIDES[g.kind], g.value)
    return out


def _logprobs(lp: pb.OutputLogProbs) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(t, v, tuple(TopLogprob(i, x) for i, x in zip(top.token_ids, top.values, strict=False)))
        for t, v, top in zip(lp.token_ids, lp.token_logprobs, lp.top_logprobs, strict=False)
    )


class SmgWorkerClient:
    """One engine's VllmEngine service, with `clients.WorkerClient`'s interface."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address  # as configured, with its `smg:` prefix
        self.channel = make_channel(address.removeprefix(PREFIX), credentials)
        self._stub = vllm_engine_pb2_grpc.VllmEngineStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def healthy(self, timeout_s: float = 1.0) -> bool | None:
        """SMG's HealthCheck says healthy; None when it got no answer in time."""
        try:
            r = await self._stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        except TimeoutError:
            return None
        return bool(r.healthy)

    async def info(self, timeout_s: float = 5.0) -> WorkerInfo:
        m = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
        s = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout_s)
        return WorkerInfo(
            model_name=m.served_model_name or m.model_path,
            max_model_len=m.max_context_length,
            vocab_size=m.vocab_size,
            eos_token_ids=tuple(m.eos_token_ids),
            device="",
            version=s.server_type,
            architecture=m.architectures[0] if m.architectures else "",
        )

    async def load(self, timeout_s: float = 1.0) -> WorkerLoad:
        r = await self._stub.GetLoads(pb.GetLoadsRequest(), timeout=timeout_s)
        return WorkerLoad(
            num_running=sum(x.num_running_reqs for x in r.loads),
            num_waiting=sum(x.num_waiting_reqs for x in r.loads),
            num_kv_blocks_used=sum(x.num_used_tokens for x in r.loads),  # tokens: the ratio is what counts
            num_kv_blocks_total=sum(x.max_total_num_tokens for x in r.loads),
        )

    async def abort(self, request_ids: Sequence[str], timeout_s: float = 1.0) -> int:
        await self._stub.Abort(pb.AbortRequest(request_ids=list(request_ids)), timeout=timeout_s)
        return len(request_ids)  # the proto does not say how many were live

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> PrefillResult:
        raise unimplemented("disaggregated prefill goes through tandem's proto (--prefill-worker), not SMG's")

    async def prefill_stream(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        lora_name: str = "",
    ) -> AsyncIterator[KVSource | PrefillResult]:
        raise unimplemented("disaggregated prefill goes through tandem's proto (--prefill-worker), not SMG's")
        yield  # (an async generator, as WorkerClient.prefill_stream)

    async def release_kv(self, handle_id: str, timeout_s: float = 1.0) -> bool:
        raise unimplemented("KV handles go through tandem's proto, not SMG's")

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
        """The engine's streaming Generate as tandem's chunks; closing the iterator cancels it."""
        if images:
            raise unimplemented("images: image inputs go through tandem's proto only")
        if sampling.is_ranked:
            raise unimplemented("best_of / use_beam_search: ranked choices go through tandem's proto only")
        if lora_name:
            raise unimplemented(f"LoRA adapters (model={lora_name!r}) go through tandem's proto only")
        if kv_source is not None:
            raise unimplemented("kv_source: KV hand-off goes through tandem's proto, not SMG's")
        if generated_token_ids:
            if sampling.n != 1:
                raise unimplemented("resuming a request of several choices is not possible over SMG's proto")
            sampling = resumed(sampling, len(generated_token_ids))
        msg = pb.GenerateRequest(
            request_id=request_id,
            tokenized=pb.TokenizedInput(input_ids=[*prompt_token_ids, *generated_token_ids]),
            sampling_params=sampling_to_smg(sampling),
            stream=True,
        )
        call = self._stub.Generate(msg, timeout=time_left())
        num_resumed = len(generated_token_ids)
        completion: dict[int, int] = {}
        try:
            async for r in call:
                if r.WhichOneof("response") == "chunk":
                    c = r.chunk
                    prompt_lps: tuple[TokenLogprob, ...] = ()
                    if c.HasField("input_logprobs"):  # tandem's shape: prompt tokens 1..
                        ilp = c.input_logprobs
                        prompt_lps = tuple(
                            TokenLogprob(
                                t,
                                e.value,
                                tuple(
                                    TopLogprob(i, x) for i, x in zip(top.token_ids, top.values, strict=False)
                                ),
                            )
                            for t, e, top in list(
                                zip(ilp.token_ids, ilp.token_logprobs, ilp.top_logprobs, strict=False)
                            )[1 : len(prompt_token_ids)]
                        )
                    delta = ChoiceDelta(
                        first_choice_index + c.index, tuple(c.token_ids), _logprobs(c.output_logprobs), None
                    )
                    yield GenerateChunk(choices=(delta,), prompt_logprobs=prompt_lps)
                else:
                    d = r.complete
                    completion[d.index] = d.completion_tokens
                    finish = ChoiceDelta(
                        first_choice_index + d.index, tuple(d.output_ids), (), d.finish_reason or "stop"
                    )
                    usage = None
                    if len(completion) == sampling.n:  # the last choice: the request's usage
                        prompt = d.prompt_tokens - num_resumed
                        usage = Usage(prompt, sum(completion.values()), min(d.cached_tokens, prompt))
                    yield GenerateChunk(choices=(finish,), usage=usage)
        finally:
            call.cancel()
