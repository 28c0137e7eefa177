"""`tandem worker --task embed` as a real process: Embed calls in flight together (mixed lengths,
chunked prefill) equal transformers within 1e-4; Info says the task; bad inputs are
INVALID_ARGUMENT naming the input; Generate and Prefill are FAILED_PRECONDITION; no KV block stays
in use afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from embedding_testlib import reference, write_tiny_embedding_model
from worker_testlib import TINY, prompts_of_lengths

from services.common.server import wait_for_serving
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_embedding_model(tmp_path_factory.mktemp("tiny-qwen3-embedding"))


@pytest.fixture(scope="module")
def address(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = f"unix:{tmp_path_factory.mktemp('embed-worker') / 'w.sock'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", str(model_dir), "--address", addr, "--task", "embed", "--device", "cpu"]
    args += [
        "--kv-cache-memory",
        "4MiB",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-batched-tokens",
        "32",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=60))
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _embed_request(rid: str, prompts: list[list[int]]) -> worker_pb2.EmbedRequest:
    return worker_pb2.EmbedRequest(
        request_id=rid, inputs=[worker_pb2.EmbedInput(token_ids=p) for p in prompts]
    )


def test_concurrent_calls_equal_transformers(address: str, model_dir: Path) -> None:
    calls = [
        prompts_of_lengths([40, 3, 17], TINY["vocab_size"], seed=1),
        prompts_of_lengths([1, 64, 9, 33, 2], TINY["vocab_size"], seed=2),
        prompts_of_lengths([MAX_MODEL_LEN], TINY["vocab_size"], seed=3),  # the whole context
        prompts_of_lengths([12], TINY["vocab_size"], seed=4),
    ]

    async def run() -> list[worker_pb2.EmbedResponse]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            return list(
                await asyncio.gather(
                    *(stub.Embed(_embed_request(f"c{i}", p), timeout=60) for i, p in enumerate(calls))
                )
            )

    replies = asyncio.run(run())
    for prompts, reply in zip(calls, replies, strict=True):
        want = reference(model_dir, prompts)
        assert [e.index for e in reply.embeddings] == list(range(len(prompts)))
        for prompt, emb, ref in zip(prompts, reply.embeddings, want, strict=True):
            assert emb.prompt_tokens == len(prompt)
            torch.testing.assert_close(torch.tensor(list(emb.values)), ref, atol=1e-4, rtol=0)
    assert _blocks_used(address) == 0


def _blocks_used(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(
            worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest()).num_kv_blocks_used
        )


def test_info_says_embed(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest())
    assert info.task == worker_pb2.WORKER_TASK_EMBED
    assert info.hidden_size == TINY["hidden_size"] and info.max_model_len == MAX_MODEL_LEN


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([], "inputs: give at least one input"),
        ([[5, 6], []], "inputs[1].token_ids: the prompt is empty"),
        ([[5, TINY["vocab_size"]]], "inputs[0].token_ids: token id 320 is not below the vocabulary size"),
        (
            [[5] * (MAX_MODEL_LEN + 1)],
            "inputs[0].token_ids: the input has 97 tokens; the context length is 96",
        ),
    ],
)
def test_bad_inputs(address: str, prompts: list[list[int]], message: str) -> None:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        worker_pb2_grpc.WorkerStub(channel).Embed(_embed_request("bad", prompts))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert _blocks_used(address) == 0


def test_generate_is_refused(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        sampling = common_pb2.SamplingParams(max_tokens=2)
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Generate(
                    worker_pb2.GenerateRequest(request_id="g", prompt_token_ids=[1, 2], sampling=sampling)
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--task embed" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(
                worker_pb2.PrefillRequest(request_id="p", prompt_token_ids=[1, 2], sampling=sampling)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cancelled_call_frees_its_blocks(address: str) -> None:
    """A call cancelled while its inputs are being computed aborts them all."""
    prompts = prompts_of_lengths([MAX_MODEL_LEN] * 6, TINY["vocab_size"], seed=9)

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Embed(_embed_request("cancel", prompts), timeout=60)
            while True:  # until the worker has started on it
                load = await stub.GetLoad(worker_pb2.GetLoadRequest())
                if load.num_kv_blocks_used > 0 or call.done():
                    break
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(run())

    async def settled() -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while True:  # the abort runs on the engine thread after the cancel arrives
                load = await stub.GetLoad(worker_pb2.GetLoadRequest())
                if load.num_kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0:
                    return 0

    assert asyncio.run(asyncio.wait_for(settled(), 30)) == 0
