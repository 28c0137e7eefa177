"""The same engine on CUDA (fp32, so transformers on the CPU stays the exact reference)."""

from __future__ import annotations

import pytest
import torch
from worker_testlib import RefModel, prompts_of_lengths

from services.worker.engine import GenerateResult
from services.worker.request import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


TF32 = pytest.mark.xfail(
    reason="triton fp32 attention runs tl.dot in TF32 (kernels/triton/*_attention.py), so a near-tie in "
    "the tiny Llama's greedy choice can flip; seen on an H200",
    strict=False,
)


@pytest.mark.parametrize(
    ("model", "backend"),
    [
        pytest.param(model, backend, marks=TF32 if (model, backend) == ("llama", "auto") else ())
        for model in ("stories", "llama", "qwen2", "qwen3")
        for backend in ("auto", "reference")
    ],
)
def test_greedy_on_cuda_matches_transformers(
    ref_models: dict[str, RefModel], model: str, backend: str
) -> None:
    ref = ref_models[model]
    engine = ref.engine(device="cuda", dtype="float32", attention_backend=backend, max_num_batched_tokens=32)
    prompts = prompts_of_lengths([1, 5, 17, 33, 40, 9, 12, 3], ref.vocab_size, seed=5)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == ref.greedy(prompt, 20)
    assert engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_on_cuda_is_batch_independent(ref_models: dict[str, RefModel]) -> None:
    ref = ref_models["stories"]
    engine = ref.engine(device="cuda", dtype="float32")
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True)
    (alone,) = engine.generate([[1, 403, 407]], sp, prefix="alone")
    others = prompts_of_lengths([4 + i for i in range(16)], ref.vocab_size, seed=2)
    params = [SamplingParams(temperature=0.7, max_tokens=25)] * 16
    batch: list[GenerateResult] = engine.generate([[1, 403, 407], *others], [sp, *params], prefix="batch")
    assert batch[0].token_ids[0] == alone.token_ids[0]
