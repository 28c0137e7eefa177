"""Pooling mode on CUDA (the lead runs these on the device): the Triton kernels, CUDA graphs for
one-token inputs and async scheduling, against transformers on the CPU in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from embedding_testlib import reference, write_tiny_embedding_model
from worker_testlib import TINY, prompts_of_lengths

from services.worker.config import WorkerConfig
from services.worker.engine import Engine

pytestmark = pytest.mark.gpu

LENGTHS = [1, 1, 3, 7, 16, 17, 40, 64, 5, 1]


@pytest.fixture(autouse=True)
def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_embedding_model(tmp_path_factory.mktemp("tiny-qwen3-embedding"))


@pytest.mark.parametrize(
    ("dtype", "atol"),
    # fp32: the Triton attention runs tl.dot in TF32, hence not 1e-4; bf16: the model's rounding
    [("float32", 2e-3), ("bfloat16", 3e-2)],
)
def test_embeddings_on_cuda(embedding_dir: Path, dtype: str, atol: float) -> None:
    engine = Engine(
        WorkerConfig(
            model=str(embedding_dir),
            device="cuda",
            dtype=dtype,
            task="embed",
            kv_cache_memory="64MiB",
            max_model_len=64,
            max_num_batched_tokens=24,
            async_scheduling="on",
        )
    )
    prompts = prompts_of_lengths(LENGTHS, TINY["vocab_size"], seed=2)
    want = reference(embedding_dir, prompts)
    for _ in range(2):  # the second time through the prefix cache
        for prompt, vector, ref in zip(prompts, engine.embed(prompts), want, strict=True):
            got = torch.tensor(vector)
            torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=f"{len(prompt)} tokens")
            assert float(torch.dot(got, ref)) > 0.999  # cosine similarity (both normalised)
        assert engine.block_manager.num_used_blocks == 0
