"""`tandem worker` as a real process, over a real gRPC connection (one worker for the module)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from worker_testlib import RefModel

from services.common.server import wait_for_serving
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def address(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sock = tmp_path_factory.mktemp("worker") / "w.sock"
    addr = f"unix:{sock}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [
        "--model",
        str(stories_dir),
        "--address",
        addr,
        "--kv-cache-memory",
        "16MiB",
        "--max-model-len",
        "256",
        "--device",
        "cpu",
        "--cpu-threads",
        "1",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=60))
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[worker_pb2_grpc.WorkerStub]:
    with grpc.insecure_channel(address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def generate(stub: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int], **sampling: Any) -> list:
    req = worker_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )
    return list(stub.Generate(req, timeout=60))


def wait_idle(stub: worker_pb2_grpc.WorkerStub) -> worker_pb2.Load:
    deadline = time.monotonic() + 10
    while True:
        load = stub.GetLoad(worker_pb2.GetLoadRequest())
        if (load.num_kv_blocks_used, load.num_running, load.num_waiting) == (
            0,
            0,
            0,
        ) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_info(stub: worker_pb2_grpc.WorkerStub) -> None:
    info = stub.Info(worker_pb2.InfoRequest())
    assert info.model_name == "stories260K" and info.architecture == "LlamaForCausalLM"
    assert info.dtype == "float32" and info.max_model_len == 256 and info.vocab_size == 512
    assert sorted(info.eos_token_ids) == [1, 2] and info.role == worker_pb2.WORKER_ROLE_UNIFIED
    assert info.kv_layout.num_layers == 5 and info.kv_layout.head_dim == 8 and info.num_kv_blocks > 0
    assert info.fingerprint


def test_generate_streams_tokens_as_produced(
    stub: worker_pb2_grpc.WorkerStub, ref_models: dict[str, RefModel]
) -> None:
    prompt = [1, 403, 407, 261, 378]
    chunks = generate(stub, "g1", prompt, temperature=0.0, max_tokens=20, logprobs=3)
    tokens = [t for c in chunks for ch in c.choices for t in ch.token_ids]
    assert tokens == ref_models["stories"].greedy(prompt, 20)
    # Streamed as produced: one chunk per step, except that steps which queued up while the rpc
    # was sending go out merged (merge_outputs), so a busy machine sees fewer, larger chunks.
    assert len(chunks) <= len(tokens) and all(ch.token_ids for c in chunks for ch in c.choices)
    assert all(not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == len(tokens)
    final = last.choices[0]
    assert final.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    if final.finish_reason == common_pb2.FINISH_REASON_STOP:
        assert final.stop_token_id == tokens[-1]
    lps = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
    assert len(lps) == len(tokens) and all(len(lp.top_logprobs) == 3 and lp.rank == 1 for lp in lps)


def test_prefix_cache_reported_in_usage(stub: worker_pb2_grpc.WorkerStub) -> None:
    prompt = [1, *range(100, 140)]
    generate(stub, "p1", prompt, temperature=0.0, max_tokens=2)
    chunks = generate(stub, "p2", [*prompt, 7], temperature=0.0, max_tokens=2)
    assert chunks[-1].usage.cached_prompt_tokens == 32
    assert stub.GetLoad(worker_pb2.GetLoadRequest()).prefix_cache_hit_rate > 0


BAD_INPUTS = [
    ({"prompt": []}, "prompt_token_ids"),
    ({"max_tokens": 250}, "max_tokens"),
    ({"prompt": [1, 512]}, "prompt_token_ids"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"temperature": math.nan}, "temperature"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": -3.0}, "presence_penalty"),
    ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ({"min_p": 2.0}, "min_p"),
    ({"top_k": -5}, "top_k"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop_token_ids": [9999]}, "stop_token_ids"),
    ({"temperature": 2.5}, "sampling.temperature"),
    ({"n": 0}, "sampling.n"),
    ({"min_tokens": 9}, "sampling.min_tokens"),
]


@pytest.mark.parametrize(("change", "field"), BAD_INPUTS)
def test_bad_input_is_invalid_argument_and_worker_keeps_serving(
    stub: worker_pb2_grpc.WorkerStub, change: dict, field: str
) -> None:
    change = dict(change)
    prompt = change.pop("prompt", [1] * 10)
    sampling = {"temperature": 0.0, "max_tokens": 4, **change}
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, f"bad-{field}", prompt, **sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert (
        generate(stub, f"ok-after-{field}", [1, 403], temperature=0.0, max_tokens=3)[
            -1
        ].usage.completion_tokens
        == 3
    )


def test_generated_tokens_require_n_1(stub: worker_pb2_grpc.WorkerStub) -> None:
    req = worker_pb2.GenerateRequest(
        request_id="resume-n2",
        prompt_token_ids=[1, 403],
        generated_token_ids=[407],
        sampling=common_pb2.SamplingParams(n=2, max_tokens=4),
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n = 1" in info.value.details()


def test_abort_ends_the_stream_and_frees_blocks(stub: worker_pb2_grpc.WorkerStub) -> None:
    req = worker_pb2.GenerateRequest(
        request_id="long",
        prompt_token_ids=[1, 403, 407],
        sampling=common_pb2.SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=250),
    )
    stream = stub.Generate(req, timeout=60)
    first = next(stream)
    assert first.choices[0].token_ids
    assert stub.Abort(worker_pb2.AbortRequest(request_ids=["long", "unknown"])).num_aborted == 1
    rest = list(stream)
    assert rest[-1].choices[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert rest[-1].usage.prompt_tokens == 3
    load = wait_idle(stub)
    assert load.num_kv_blocks_used == 0 and load.num_running == 0


def test_cancelled_stream_frees_blocks(stub: worker_pb2_grpc.WorkerStub) -> None:
    req = worker_pb2.GenerateRequest(
        request_id="cancelled",
        prompt_token_ids=[1, *range(10, 60)],
        sampling=common_pb2.SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=200, n=3),
    )
    stream = stub.Generate(req, timeout=60)
    next(stream)
    next(stream)
    stream.cancel()
    load = wait_idle(stub)
    assert load.num_kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0
    assert (
        generate(stub, "after-cancel", [1, 403], temperature=0.0, max_tokens=2)[-1].usage.completion_tokens
        == 2
    )


def test_prompt_logprobs_on_the_first_chunk(stub: worker_pb2_grpc.WorkerStub) -> None:
    prompt = [1, 403, 407, 261, 378]
    chunks = generate(stub, "plp", prompt, temperature=0.0, max_tokens=3, prompt_logprobs=2)
    assert [lp.token_id for lp in chunks[0].prompt_logprobs] == prompt[1:]
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in chunks[0].prompt_logprobs)
    assert all(not c.prompt_logprobs for c in chunks[1:])


async def test_concurrent_streams_are_batched_and_exact(
    address: str, ref_models: dict[str, RefModel]
) -> None:
    from services.common.channels import make_channel

    prompts = [[1, *range(30, 30 + 4 * i)] for i in range(8)]
    async with make_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)

        async def one(i: int) -> tuple[list[int], int]:
            req = worker_pb2.GenerateRequest(
                request_id=f"conc-{i}",
                prompt_token_ids=prompts[i],
                sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=16),
            )
            tokens, chunks = [], 0
            async for chunk in stub.Generate(req, timeout=60):
                chunks += 1
                tokens += [t for c in chunk.choices for t in c.token_ids]
            return tokens, chunks

        results = await asyncio.gather(*(one(i) for i in range(8)))
    for prompt, (tokens, chunks) in zip(prompts, results, strict=True):
        assert tokens == ref_models["stories"].greedy(prompt, 16)
        # a token per message, except where outputs queued up while the stream was sending (a
        # loaded host): those go out as one message (rpc.py), never more messages than tokens
        assert 1 <= chunks <= len(tokens)


def test_embed_is_refused_by_a_generate_worker(stub: worker_pb2_grpc.WorkerStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(worker_pb2.EmbedRequest(request_id="e", inputs=[worker_pb2.EmbedInput(token_ids=[1, 2])]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--task embed" in err.value.details()
    info = stub.Info(worker_pb2.InfoRequest())
    assert info.task == worker_pb2.WORKER_TASK_GENERATE
