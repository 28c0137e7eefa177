"""Qwen2.5-VL image chats through `tandem up` and the official openai client: the answers equal
transformers' greedy generate on the same conversation (one, two and no images, in parallel)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
from llava_testlib import data_url, png
from qwen_testlib import EOS, MAX_TOKENS, hf_answer, hf_processor

from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.e2e.stack import UpProcess

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def hf(qwen_vl_dir: Path) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_vl_dir), dtype=torch.float32).eval()
    return model, hf_processor(qwen_vl_dir)


def expected_answer(hf: tuple[Any, Any], parts: list[str | bytes]) -> tuple[str, int]:
    """transformers' greedy answer as text, and the prompt's token count."""
    model, processor = hf
    tokens, prompt_len = hf_answer(model, processor, parts)
    return processor.tokenizer.decode([t for t in tokens if t != EOS], skip_special_tokens=True), prompt_len


def chat(client: openai.OpenAI, parts: list[str | bytes]) -> tuple[str, int]:
    content = [
        {"type": "text", "text": p}
        if isinstance(p, str)
        else {"type": "image_url", "image_url": {"url": data_url(p)}}
        for p in parts
    ]
    reply = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item,misc]
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


CONVERSATIONS: list[list[str | bytes]] = [
    ["What is this? ", png(60, 90, seed=0)],
    [png(200, 50, seed=1), " versus ", png(30, 30, seed=2), " which one?"],
    ["Only text here."],
    ["Describe ", png(300, 200, seed=3)],
]


def check_answers(client: openai.OpenAI, hf: tuple[Any, Any]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(CONVERSATIONS)) as pool:  # one batch in the worker
        answers = list(pool.map(lambda c: chat(client, c), CONVERSATIONS))
    for conversation, answer in zip(CONVERSATIONS, answers, strict=True):
        assert answer == expected_answer(hf, conversation)


@pytest.fixture(scope="module", params=[0, 1], ids=["in-worker", "encode-worker"])
def up(
    request: pytest.FixtureRequest, qwen_vl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UpProcess]:
    """`tandem up` with the encoder in the worker, then in its own `--role encode` worker."""
    run_dir = tmp_path_factory.mktemp("up")
    args = ["--device", "cpu", "--served-model-name", "qwen-vl", "--run-dir", str(run_dir)]
    process = UpProcess(qwen_vl_dir, *args, "--encode-workers", str(request.param))
    process.run_dir = run_dir  # type: ignore[attr-defined]
    try:
        process.wait_healthy(timeout_s=180)
        yield process
    finally:
        process.stop()


def worker_info(run_dir: Path, name: str) -> worker_pb2.WorkerInfo:
    with grpc.insecure_channel(f"unix:{run_dir / name}.sock") as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)


def encoder_counters(run_dir: Path, name: str) -> tuple[int, int]:
    """(images encoded, encoder-cache hits) from a worker's Info."""
    info = worker_info(run_dir, name)
    return info.num_images_encoded, info.num_encoder_cache_hits


def test_image_chats_through_tandem_up(up: UpProcess, hf: tuple[Any, Any]) -> None:
    """The same answers with the encoder in the worker and in an encode worker; the images are
    encoded where they should be, and a repeated image in a later turn is not encoded again."""
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    check_answers(client, hf)
    run_dir: Path = up.run_dir  # type: ignore[attr-defined]
    encoder = "encode-worker-0" if (run_dir / "encode-worker-0.sock").exists() else "worker-0"
    encoded, hits = encoder_counters(run_dir, encoder)
    assert encoded == 4  # every distinct image once (each conversation has its own)
    if encoder != "worker-0":
        assert encoder_counters(run_dir, "worker-0") == (0, 0)  # it took the encode worker's rows
        with (
            grpc.insecure_channel(f"unix:{run_dir / 'worker-0'}.sock") as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            worker_pb2_grpc.WorkerStub(channel).Encode(worker_pb2.EncodeRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    # A later turn with the first conversation's image, after other text: the prefix cache does
    # not cover it, so its rows come from the unified worker's encoder cache, and the gateway,
    # which sent it there before, sends its hash alone (no pixels, no encode worker asked).
    before = worker_info(run_dir, "worker-0")
    image = CONVERSATIONS[0][1]
    later = ["Earlier you saw this: ", image, " -- what was it again?"]
    assert chat(client, later) == expected_answer(hf, later)
    after = worker_info(run_dir, "worker-0")
    assert after.num_images_by_hash == before.num_images_by_hash + 1
    assert after.image_bytes_received == before.image_bytes_received
    assert after.num_encoder_cache_hits == before.num_encoder_cache_hits + 1
    assert encoder_counters(run_dir, encoder) == (
        (encoded, hits + 1) if encoder == "worker-0" else (encoded, hits)
    )
