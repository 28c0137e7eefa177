"""OpenEngine conformance (openengine.v1.Inference / Control) with the generated stubs.

Runs against the tandem worker this suite starts, or against any engine: `pytest tests/protocols
--target HOST:PORT`. Checks marked tandem-only (the `own_worker` fixture) compare with tandem's
own proto or assert tandem's documented UNIMPLEMENTED answers; the rest hold for any engine that
serves a model with a vocabulary of more than 500 tokens and a context of at least 256.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from openengine.v1 import (
    generation_pb2,
    kv_pb2,
    lifecycle_pb2,
    lora_pb2,
    model_pb2,
    openengine_pb2_grpc,
    server_pb2,
)

PROMPT = [1, 403, 407, 261, 378]


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> openengine_pb2_grpc.InferenceStub:
    return openengine_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def control(channel: grpc.Channel) -> openengine_pb2_grpc.ControlStub:
    return openengine_pb2_grpc.ControlStub(channel)


def request(rid: str, prompt: list[int] = PROMPT, **fields: Any) -> generation_pb2.GenerateRequest:
    fields.setdefault("sampling", generation_pb2.SamplingParams(temperature=0.0))
    return generation_pb2.GenerateRequest(
        request_id=rid, token_ids=generation_pb2.TokenIds(ids=prompt), **fields
    )


def stopping(max_tokens: int, **fields: Any) -> generation_pb2.StoppingOptions:
    return generation_pb2.StoppingOptions(max_tokens=max_tokens, **fields)


def tokens_of(events: list[generation_pb2.GenerateResponse], index: int = 0) -> list[int]:
    return [
        t.token_id
        for e in events
        if e.WhichOneof("event") == "token" and e.token.output_index == index
        for t in e.token.tokens
    ]


def finished(events: list[generation_pb2.GenerateResponse]) -> list[generation_pb2.GenerationFinished]:
    return [e.finished for e in events if e.WhichOneof("event") == "finished"]


def wait_idle(control: openengine_pb2_grpc.ControlStub) -> server_pb2.LoadInfo:
    deadline = time.monotonic() + 10
    while True:
        load = control.GetLoad(server_pb2.GetLoadRequest())
        idle = load.running_requests == 0 and load.queued_requests == 0 and load.used_kv_blocks == 0
        if idle or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


# ---- discovery ---------------------------------------------------------------------------------
def test_server_info(control: openengine_pb2_grpc.ControlStub, own_worker: bool) -> None:
    info = control.GetServerInfo(server_pb2.GetServerInfoRequest())
    assert info.engine_name and info.schema_revision >= 1 and info.supported_models
    assert info.engine_role != server_pb2.ENGINE_ROLE_UNSPECIFIED
    if own_worker:
        assert info.engine_name == "tandem" and info.engine_role == server_pb2.ENGINE_ROLE_AGGREGATED
        assert info.supported_models == ["stories260K"] and info.capacity.total_kv_blocks > 0
        assert info.parallelism.tensor_parallel_size == 1


def test_model_info(control: openengine_pb2_grpc.ControlStub, own_worker: bool) -> None:
    info = control.GetModelInfo(model_pb2.GetModelInfoRequest())
    assert info.served_model_name and info.supports_token_ids_input
    if own_worker:
        assert info.max_context_length == 256 and info.supports_text_input  # stories260K has a tokenizer
        assert info.generation.guided_decoding.supported and not info.supports_lora
    with pytest.raises(grpc.RpcError) as err:
        control.GetModelInfo(model_pb2.GetModelInfoRequest(model="no-such-model"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_ready(control: openengine_pb2_grpc.ControlStub) -> None:
    health = control.Health(lifecycle_pb2.HealthRequest())
    assert health.state == lifecycle_pb2.HEALTH_STATE_READY


# ---- generation --------------------------------------------------------------------------------
def test_greedy_stream_tokens_finish_and_usage(inference: openengine_pb2_grpc.InferenceStub) -> None:
    events = list(
        inference.Generate(request("oe-greedy", stopping=stopping(12, ignore_eos=True)), timeout=60)
    )
    assert all(e.request_id == "oe-greedy" for e in events)
    assert sum(e.WhichOneof("event") == "token" for e in events) > 1, "tokens stream, not one reply"
    assert len(tokens_of(events)) == 12
    [done] = finished(events)
    assert done.output_index == 0 and done.reason == generation_pb2.FINISH_REASON_LENGTH
    usage = events[-1].usage
    assert usage.prompt_tokens == len(PROMPT) and usage.completion_tokens == 12
    assert usage.total_tokens == len(PROMPT) + 12


def test_greedy_tokens_equal_tandems_own_proto(
    inference: openengine_pb2_grpc.InferenceStub, channel: grpc.Channel, own_worker: bool
) -> None:
    if not own_worker:
        pytest.skip("compares with tandem.v1.Worker on the same worker")
    from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    native = worker_pb2_grpc.WorkerStub(channel).Generate(
        worker_pb2.GenerateRequest(
            request_id="native-greedy",
            prompt_token_ids=PROMPT,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=30),
        ),
        timeout=60,
    )
    native_tokens = [t for chunk in native for c in chunk.choices for t in c.token_ids]
    events = list(inference.Generate(request("oe-greedy-cmp", stopping=stopping(30)), timeout=60))
    assert tokens_of(events) == native_tokens and len(native_tokens) > 0


def test_stop_token_id_ends_with_a_stop_match(inference: openengine_pb2_grpc.InferenceStub) -> None:
    first = tokens_of(list(inference.Generate(request("oe-probe", stopping=stopping(8, ignore_eos=True)))))
    stop_id = first[3]
    cond = generation_pb2.StopCondition(stop_token_id=stop_id)
    events = list(
        inference.Generate(request("oe-stop", stopping=stopping(8, ignore_eos=True, conditions=[cond])))
    )
    [done] = finished(events)
    assert done.reason == generation_pb2.FINISH_REASON_STOP and done.stop_match.stop_token_id == stop_id
    assert tokens_of(events) == first[: first.index(stop_id) + 1]  # the stop token is in the output


def test_stop_text_ends_the_output_where_it_completes(
    inference: openengine_pb2_grpc.InferenceStub,
    control: openengine_pb2_grpc.ControlStub,
    channel: grpc.Channel,
    own_worker: bool,
) -> None:
    if not own_worker:
        pytest.skip("needs the model's tokenizer here to choose a stop string")
    from transformers import AutoTokenizer

    from tandem.smg import vllm_engine_pb2, vllm_engine_pb2_grpc

    path = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetModelInfo(vllm_engine_pb2.GetModelInfoRequest())
    tok = AutoTokenizer.from_pretrained(path.tokenizer_path)
    ids = tokens_of(list(inference.Generate(request("oe-full", stopping=stopping(30, ignore_eos=True)))))
    stop = tok.decode(ids[:6])[-4:]
    assert stop.strip() and stop not in tok.decode(ids[:5])
    cond = generation_pb2.StopCondition(stop_text=stop)
    events = list(
        inference.Generate(request("oe-stoptext", stopping=stopping(30, ignore_eos=True, conditions=[cond])))
    )
    [done] = finished(events)
    first_match = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    assert done.reason == generation_pb2.FINISH_REASON_STOP and done.stop_match.stop_text == stop
    assert tokens_of(events) == ids[:first_match] and events[-1].usage.completion_tokens == first_match
    assert wait_idle(control).used_kv_blocks == 0


def test_num_sequences(inference: openengine_pb2_grpc.InferenceStub) -> None:
    sampling = generation_pb2.SamplingParams(temperature=1.0, seed=7, num_sequences=3)
    events = list(
        inference.Generate(request("oe-n", sampling=sampling, stopping=stopping(5, ignore_eos=True)))
    )
    assert sorted(f.output_index for f in finished(events)) == [0, 1, 2]
    assert all(len(tokens_of(events, i)) == 5 for i in range(3))
    assert events[-1].usage.completion_tokens == 15


def test_output_logprobs_top_n(inference: openengine_pb2_grpc.InferenceStub) -> None:
    response = generation_pb2.ResponseOptions(
        return_output_logprobs=True, output_candidates=generation_pb2.CandidateTokenSelection(top_n=2)
    )
    events = list(inference.Generate(request("oe-lp", response=response, stopping=stopping(4))))
    infos = [t for e in events if e.WhichOneof("event") == "token" for t in e.token.tokens]
    assert infos and all(t.HasField("logprob") and t.logprob <= 0 and len(t.candidates) == 2 for t in infos)
    assert all(t.rank == 1 for t in infos), "greedy picks the most likely token"


def test_text_prompt_when_the_engine_tokenizes(
    inference: openengine_pb2_grpc.InferenceStub, control: openengine_pb2_grpc.ControlStub
) -> None:
    if not control.GetModelInfo(model_pb2.GetModelInfoRequest()).supports_text_input:
        pytest.skip("the engine takes token ids only")
    msg = generation_pb2.GenerateRequest(
        request_id="oe-text",
        prompt="Once upon a time",
        sampling=generation_pb2.SamplingParams(temperature=0.0),
        stopping=stopping(4, ignore_eos=True),
    )
    events = list(inference.Generate(msg, timeout=60))
    assert len(tokens_of(events)) == 4 and events[-1].usage.prompt_tokens > 0


def test_guided_choice(
    inference: openengine_pb2_grpc.InferenceStub, control: openengine_pb2_grpc.ControlStub
) -> None:
    if not control.GetModelInfo(model_pb2.GetModelInfoRequest()).generation.guided_decoding.supported:
        pytest.skip("the engine has no guided decoding")
    guided = generation_pb2.GuidedDecoding(choice=generation_pb2.ChoiceConstraint(choices=["yes", "no"]))
    events = list(inference.Generate(request("oe-guided", guided=guided, stopping=stopping(10)), timeout=60))
    [done] = finished(events)
    assert done.reason == generation_pb2.FINISH_REASON_STOP and tokens_of(events)


# ---- abort, cancel, load -----------------------------------------------------------------------
def test_abort_mid_stream(
    inference: openengine_pb2_grpc.InferenceStub, control: openengine_pb2_grpc.ControlStub
) -> None:
    sampling = generation_pb2.SamplingParams(temperature=1.0)
    call = inference.Generate(
        request("oe-abort", sampling=sampling, stopping=stopping(240, ignore_eos=True)), timeout=60
    )
    first = next(call)
    assert first.WhichOneof("event") == "token"
    reply = control.Abort(lifecycle_pb2.AbortRequest(request_id="oe-abort"))
    assert reply.status == lifecycle_pb2.ABORT_STATUS_ABORTED
    rest = list(call)
    [done] = finished(rest)
    assert done.reason == generation_pb2.FINISH_REASON_CANCELLED
    assert len(tokens_of([first, *rest])) < 240
    again = control.Abort(lifecycle_pb2.AbortRequest(request_id="oe-abort"))
    assert again.status == lifecycle_pb2.ABORT_STATUS_ALREADY_FINISHED
    assert wait_idle(control).used_kv_blocks == 0


def test_abort_all_requests(
    inference: openengine_pb2_grpc.InferenceStub, control: openengine_pb2_grpc.ControlStub
) -> None:
    sampling = generation_pb2.SamplingParams(temperature=1.0)
    calls = [
        inference.Generate(request(f"oe-all-{i}", sampling=sampling, stopping=stopping(240, ignore_eos=True)))
        for i in range(2)
    ]
    for call in calls:
        next(call)  # both running
    reply = control.Abort(lifecycle_pb2.AbortRequest(all_requests=lifecycle_pb2.AllRequests()))
    assert reply.status == lifecycle_pb2.ABORT_STATUS_ABORTED
    for call in calls:
        [done] = finished(list(call))
        assert done.reason == generation_pb2.FINISH_REASON_CANCELLED
    assert wait_idle(control).used_kv_blocks == 0


def test_client_cancel_frees_the_engine(
    inference: openengine_pb2_grpc.InferenceStub, control: openengine_pb2_grpc.ControlStub
) -> None:
    sampling = generation_pb2.SamplingParams(temperature=1.0, num_sequences=2)
    call = inference.Generate(
        request("oe-cancel", sampling=sampling, stopping=stopping(240, ignore_eos=True))
    )
    next(call)
    assert control.GetLoad(server_pb2.GetLoadRequest()).running_requests >= 1
    call.cancel()
    load = wait_idle(control)
    assert (load.running_requests, load.queued_requests, load.used_kv_blocks) == (0, 0, 0)
    assert load.total_kv_blocks > 0


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (generation_pb2.GenerateRequest(request_id="oe-bad-input"), "input"),
        (request("oe-bad-empty", prompt=[]), "prompt"),
        (request("oe-bad-vocab", prompt=[1, 10_000_000]), "prompt"),
        (request("oe-bad-temp", sampling=generation_pb2.SamplingParams(temperature=-1.0)), "temperature"),
        (request("oe-bad-topp", sampling=generation_pb2.SamplingParams(top_p=float("nan"))), "top_p"),
    ],
)
def test_bad_requests_are_invalid_argument(
    inference: openengine_pb2_grpc.InferenceStub,
    msg: generation_pb2.GenerateRequest,
    field: str,
    own_worker: bool,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(inference.Generate(msg, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if own_worker:
        assert field in (err.value.details() or "")


def test_unknown_model_is_not_found(inference: openengine_pb2_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(inference.Generate(request("oe-model", model="no-such-model"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


UNSUPPORTED_BY_TANDEM = [
    (
        "stopping.conditions.stop_text",
        {
            "sampling": generation_pb2.SamplingParams(num_sequences=2),
            "stopping": stopping(4, conditions=[generation_pb2.StopCondition(stop_text="x")]),
        },
    ),
    (
        "media",
        {"media": [generation_pb2.MediaItem(modality=generation_pb2.MODALITY_IMAGE, url="http://x/y.png")]},
    ),
    ("lora_name", {"lora_name": "adapter"}),
    (
        "kv.session.transfer_backend",
        {
            "kv": generation_pb2.KvOptions(
                session=kv_pb2.KvSessionRef(session_id="s", transfer_backend="nixl")
            )
        },
    ),
    ("kv.cache_salt", {"kv": generation_pb2.KvOptions(cache_salt="salt")}),
    ("guided.structural_tag", {"guided": generation_pb2.GuidedDecoding(structural_tag="{}")}),
    (
        "response.output_candidates.token_ids",
        {
            "response": generation_pb2.ResponseOptions(
                output_candidates=generation_pb2.CandidateTokenSelection(
                    token_ids=generation_pb2.TokenIds(ids=[5])
                )
            )
        },
    ),
]


@pytest.mark.parametrize(
    ("field", "fields"), UNSUPPORTED_BY_TANDEM, ids=[f for f, _ in UNSUPPORTED_BY_TANDEM]
)
def test_unsupported_fields_are_unimplemented_never_ignored(
    inference: openengine_pb2_grpc.InferenceStub, field: str, fields: dict[str, Any], own_worker: bool
) -> None:
    if not own_worker:
        pytest.skip("what an engine leaves out is its own (tandem's list: docs/protocols.md)")
    with pytest.raises(grpc.RpcError) as err:
        list(inference.Generate(request(f"oe-unsupported-{field}", **fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (err.value.details() or "").startswith(f"{field}: ")


def test_worker_keeps_serving_after_refusals(inference: openengine_pb2_grpc.InferenceStub) -> None:
    events = list(inference.Generate(request("oe-after", stopping=stopping(3, ignore_eos=True)), timeout=60))
    assert len(tokens_of(events)) == 3


# ---- LoRA and KV events: served or UNIMPLEMENTED, never a hang or a wrong answer ----------------
def test_lora_rpcs(control: openengine_pb2_grpc.ControlStub, own_worker: bool) -> None:
    assert list(control.ListLoras(lora_pb2.ListLorasRequest()).adapters) == [] or not own_worker
    if own_worker:
        with pytest.raises(grpc.RpcError) as err:
            control.LoadLora(
                lora_pb2.LoadLoraRequest(adapter=lora_pb2.LoraAdapter(lora_name="a", source_path="/x"))
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            control.UnloadLora(lora_pb2.UnloadLoraRequest(lora_name="a"))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
