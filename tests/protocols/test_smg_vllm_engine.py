"""SMG's `vllm.grpc.engine.VllmEngine` conformance with the generated stubs (`--target HOST:PORT`
drives another engine; tandem-only checks are skipped there)."""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from typing import Any

import grpc
import pytest

from tandem.smg import common_pb2 as smg_common_pb2
from tandem.smg import vllm_engine_pb2 as pb
from tandem.smg import vllm_engine_pb2_grpc

PROMPT = [1, 403, 407, 261, 378]


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vllm_engine_pb2_grpc.VllmEngineStub:
    return vllm_engine_pb2_grpc.VllmEngineStub(channel)


def request(rid: str, prompt: list[int] = PROMPT, stream: bool = True, **sampling: Any) -> pb.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return pb.GenerateRequest(
        request_id=rid,
        tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
    )


def streamed(responses: list[pb.GenerateResponse], index: int = 0) -> list[int]:
    return [
        t
        for r in responses
        if r.WhichOneof("response") == "chunk" and r.chunk.index == index
        for t in r.chunk.token_ids
    ]


def completes(responses: list[pb.GenerateResponse]) -> list[pb.GenerateComplete]:
    return [r.complete for r in responses if r.WhichOneof("response") == "complete"]


def idle(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> pb.SchedulerLoad:
    deadline = time.monotonic() + 10
    while True:
        [load] = stub.GetLoads(pb.GetLoadsRequest()).loads
        if (load.num_running_reqs, load.num_waiting_reqs, load.num_used_tokens) == (0, 0, 0):
            return load
        assert time.monotonic() < deadline, load
        time.sleep(0.05)


def test_health_model_and_server_info(stub: vllm_engine_pb2_grpc.VllmEngineStub, own_worker: bool) -> None:
    assert stub.HealthCheck(pb.HealthCheckRequest()).healthy
    model = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert model.is_generation and model.max_context_length >= 256 and model.vocab_size > 500
    server = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server.server_type and server.data_parallel_size >= 1
    if own_worker:
        assert model.served_model_name == "stories260K" and sorted(model.eos_token_ids) == [1, 2]
        assert model.architectures == ["LlamaForCausalLM"] and server.server_type == "tandem-grpc"


def test_stream_and_whole_agree(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    chunks = list(stub.Generate(request("smg-s", max_tokens=10, ignore_eos=True), timeout=60))
    [done] = completes(chunks)
    assert len(streamed(chunks)) == 10 and done.finish_reason == "length"
    assert done.prompt_tokens == len(PROMPT) and done.completion_tokens == 10
    whole = list(stub.Generate(request("smg-w", stream=False, max_tokens=10, ignore_eos=True), timeout=60))
    [only] = completes(whole)
    assert len(whole) == 1 and list(only.output_ids) == streamed(chunks)


def test_greedy_tokens_equal_tandems_own_proto(
    stub: vllm_engine_pb2_grpc.VllmEngineStub, channel: grpc.Channel, own_worker: bool
) -> None:
    if not own_worker:
        pytest.skip("compares with tandem.v1.Worker on the same worker")
    from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    native = worker_pb2_grpc.WorkerStub(channel).Generate(
        worker_pb2.GenerateRequest(
            request_id="smg-native",
            prompt_token_ids=PROMPT,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=30),
        ),
        timeout=60,
    )
    tokens = [t for chunk in native for c in chunk.choices for t in c.token_ids]
    [done] = completes(list(stub.Generate(request("smg-cmp", stream=False, max_tokens=30), timeout=60)))
    assert list(done.output_ids) == tokens and tokens


def test_logit_bias_forces_and_bans(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    [probe] = completes(list(stub.Generate(request("smg-lb0", stream=False, max_tokens=4, ignore_eos=True))))
    forced = next(t for t in range(5, 500) if t not in probe.output_ids)
    [done] = completes(
        list(
            stub.Generate(
                request("smg-lb1", stream=False, max_tokens=4, ignore_eos=True, logit_bias={forced: 100.0})
            )
        )
    )
    assert list(done.output_ids) == [forced] * 4
    first = probe.output_ids[0]
    [banned] = completes(
        list(
            stub.Generate(
                request("smg-lb2", stream=False, max_tokens=4, ignore_eos=True, logit_bias={first: -100.0})
            )
        )
    )
    assert first not in banned.output_ids


def test_stop_token_n_and_logprobs(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    [probe] = completes(
        list(stub.Generate(request("smg-probe", stream=False, max_tokens=8, ignore_eos=True)))
    )
    stop = probe.output_ids[2]
    [done] = completes(
        list(
            stub.Generate(
                request("smg-stop", stream=False, max_tokens=8, ignore_eos=True, stop_token_ids=[stop])
            )
        )
    )
    assert done.finish_reason == "stop" and done.matched_token_id == stop
    assert list(done.output_ids) == list(probe.output_ids[: list(probe.output_ids).index(stop) + 1])
    sampled = list(
        stub.Generate(request("smg-n", max_tokens=4, ignore_eos=True, n=2, temperature=1.0, seed=3))
    )
    assert sorted(c.index for c in completes(sampled)) == [0, 1]
    assert all(len(streamed(sampled, i)) == 4 for i in range(2))
    [lp] = completes(
        list(stub.Generate(request("smg-lp", stream=False, max_tokens=3, logprobs=2, prompt_logprobs=1)))
    )
    assert len(lp.output_logprobs.token_logprobs) == 3 and all(
        len(t.values) == 2 for t in lp.output_logprobs.top_logprobs
    )
    assert list(lp.input_logprobs.token_ids) == PROMPT and not lp.input_logprobs.token_logprobs[0].HasField(
        "value"
    )


def test_stop_string_ends_the_choice_where_it_completes(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    """A stop string that spans tokens: the choice ends with the token that completes it, and
    the engine request is gone (load back to idle)."""
    text = pb.GenerateRequest(
        request_id="smg-text",
        text="Once upon a time",
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        stream=False,
    )
    [full] = completes(list(stub.Generate(text, timeout=60)))
    stop_request = pb.GenerateRequest()
    stop_request.CopyFrom(text)
    stop_request.request_id = "smg-stopstr"
    stop_request.sampling_params.stop.append("STOP-NEVER-SEEN")
    [unstopped] = completes(list(stub.Generate(stop_request, timeout=60)))
    assert list(unstopped.output_ids) == list(full.output_ids) and unstopped.finish_reason == "length"
    model_path = stub.GetModelInfo(pb.GetModelInfoRequest()).tokenizer_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = list(full.output_ids)
    upto = tok.decode(ids[:6])
    stop = upto[-4:]
    assert stop.strip() and stop not in tok.decode(ids[:5])
    stop_request.request_id = "smg-stopstr2"
    stop_request.sampling_params.stop[:] = [stop]
    for stream in (False, True):
        stop_request.stream = stream
        responses = list(stub.Generate(stop_request, timeout=60))
        [done] = completes(responses)
        output = streamed(responses) if stream else list(done.output_ids)
        assert done.finish_reason == "stop" and done.matched_stop_str == stop
        first_match = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
        assert output == ids[:first_match] and done.completion_tokens == first_match
    idle(stub)


def test_abort_mid_stream_frees_the_engine(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    call = stub.Generate(request("smg-abort", max_tokens=240, ignore_eos=True, temperature=1.0), timeout=60)
    assert next(call).WhichOneof("response") == "chunk"
    stub.Abort(pb.AbortRequest(request_ids=["smg-abort"]))
    [done] = completes(list(call))
    assert done.finish_reason == "abort" and done.completion_tokens < 240
    idle(stub)


def test_bad_requests(stub: vllm_engine_pb2_grpc.VllmEngineStub, own_worker: bool) -> None:
    bad = [
        pb.GenerateRequest(request_id="smg-none"),
        request("smg-vocab", prompt=[1, 10_000_000]),
        request("smg-seed", seed=-1),
        request("smg-topk", top_k=2**31),
        request("smg-temp", temperature=float("nan")),
    ]
    for msg in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(msg, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if not own_worker:
        return
    for field, sampling in [
        ("sampling_params.stop", {"stop": ["."], "n": 2}),
        ("sampling_params.truncate_prompt_tokens", {"truncate_prompt_tokens": 5}),
        ("sampling_params.structural_tag", {"structural_tag": "{}"}),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(f"smg-{field}", **sampling), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and (err.value.details() or "").startswith(
            field
        )


def test_get_tokenizer_is_a_zip_with_its_sha256(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    chunks = list(stub.GetTokenizer(smg_common_pb2.GetTokenizerRequest(), timeout=30))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "tokenizer.json" in archive.namelist()
        json.loads(archive.read("tokenizer.json"))


def test_kv_events_and_embed(stub: vllm_engine_pb2_grpc.VllmEngineStub, own_worker: bool) -> None:
    if not own_worker:
        pytest.skip("what an engine leaves out is its own")
    calls = [
        lambda: next(stub.SubscribeKvEvents(smg_common_pb2.SubscribeKvEventsRequest(), timeout=10)),
        lambda: stub.Embed(
            pb.EmbedRequest(request_id="e", tokenized=pb.TokenizedInput(input_ids=[1])), timeout=10
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
