"""Tensor and pipeline parallelism on the CPU (gloo): greedy tokens of T = 2, T = 4, P = 2 and
T = 2 x P = 2 groups equal T = P = 1 and transformers, logprobs within 1e-4, with 8 requests in
flight, chunked prefill and forks."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.engine import GenerateResult
from services.worker.request import SamplingParams
from tests.parallel.conftest import GroupRun
from tests.worker.worker_testlib import RefModel, prompts_of_lengths

LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5]  # 8 requests in flight; the long ones are chunked (budget 16)
MAX_TOKENS = 10


# T = P = 1 results by (model, n): several tests compare groups of one model with the same baseline
_BASELINES: dict[tuple[str, int], list[GenerateResult]] = {}


def _baseline(ref: RefModel, name: str, prompts: list[list[int]], n: int) -> list[GenerateResult]:
    if (name, n) not in _BASELINES:
        single = ref.engine(kv_cache_memory="4MiB", max_num_batched_tokens=16)
        _BASELINES[(name, n)] = single.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3, n=n)
        )
    return _BASELINES[(name, n)]


def _check(ref: RefModel, name: str, tp: int, tmp_path: Path, n: int = 1, pp: int = 1) -> None:
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=3)
    options = ["--model", str(ref.path), "--device", "cpu", "--kv-cache-memory", "4MiB"]
    options += ["--max-num-batched-tokens", "16", "--cpu-threads", "1"]
    group = GroupRun(
        tmp_path,
        {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 3, "n": n},
        *options,
        "--tensor-parallel-size",
        str(tp),
        "--pipeline-parallel-size",
        str(pp),
    )
    # the baseline and transformers' tokens while the group runs
    base = _baseline(ref, name, prompts, n)
    expected = [ref.greedy(prompt, MAX_TOKENS) for prompt in prompts]
    got = group.result()
    assert got["used_blocks"] == 0
    # the folded norms in groups too (the reference bundle folds; Qwen2 / Qwen3, Qwen3-MoE and
    # gpt-oss keep their norms: models/llama.py can_fold_norms, models/qwen3_moe.py)
    assert got["norms_folded"] == name.startswith("llama"), name
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        assert result.token_ids[0] == expected[i]  # T = 1 (the baseline itself)
        for choice in range(n):  # forks share the prompt's blocks (copy-on-fork on every rank)
            assert got["tokens"][i][str(choice)] == expected[i], (
                f"{name} T={tp} P={pp}: prompt of {len(prompt)}"
            )
        ours = got["logprobs"][i]
        theirs = [lp.logprob for lp in result.logprobs[0]]
        assert len(ours) == len(theirs)
        assert max((abs(a - b) for a, b in zip(ours, theirs, strict=True)), default=0.0) < 1e-4
        top_ids = [[t for t, _ in step] for step in got["top"][i]]
        assert top_ids == [[t for t, _ in lp.top] for lp in result.logprobs[0]]


def test_llama_gqa_t2_equals_t1_and_transformers(tp_refs: dict[str, RefModel], tmp_path: Path) -> None:
    _check(tp_refs["llama_gqa"], "llama_gqa", 2, tmp_path, n=2)


def test_llama_pipeline_p2_equals_t1_and_transformers(tp_refs: dict[str, RefModel], tmp_path: Path) -> None:
    _check(tp_refs["llama_gqa"], "llama_gqa", 1, tmp_path, pp=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tp", "pp"),
    # (llama: the folded norms with T x P, rank 0 of each stage adding the residual)
    [("qwen2", 2, 2), ("qwen3_moe", 1, 2), ("llama_three_layers", 1, 2), ("llama_gqa", 2, 2)],
)
def test_tp_times_pp_equals_t1(
    tp_refs: dict[str, RefModel], name: str, tp: int, pp: int, tmp_path: Path
) -> None:
    _check(tp_refs[name], name, tp, tmp_path, pp=pp)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tp"),
    [
        ("llama_gqa", 4),
        ("llama_mha", 2),
        ("qwen2", 2),
        ("qwen3", 2),
        ("qwen3", 4),
        ("qwen3_moe", 2),
        ("gpt_oss", 2),
    ],
)
def test_tp_equals_t1_and_transformers(
    tp_refs: dict[str, RefModel], name: str, tp: int, tmp_path: Path
) -> None:
    _check(tp_refs[name], name, tp, tmp_path)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_embed_group_equals_transformers(tp: int, pp: int, tmp_path: Path) -> None:
    """--task embed in a group: the pooled rows are rank 0's normed hidden states; the ranks load
    a base-model checkpoint (no LM head) too."""
    import torch

    from tests.worker.embedding_testlib import reference, write_tiny_embedding_model

    model = write_tiny_embedding_model(tmp_path / "model")
    prompts = prompts_of_lengths(LENGTHS, 320, seed=3)
    options = ["--model", str(model), "--device", "cpu", "--kv-cache-memory", "4MiB", "--task", "embed"]
    options += ["--max-num-batched-tokens", "16", "--cpu-threads", "1"]
    group = GroupRun(
        tmp_path,
        {"prompts": prompts},
        *options,
        "--tensor-parallel-size",
        str(tp),
        "--pipeline-parallel-size",
        str(pp),
    )
    expected = reference(model, prompts)  # while the group runs
    got = group.result()
    assert got["used_blocks"] == 0
    for vector, ref in zip(got["embeddings"], expected, strict=True):
        torch.testing.assert_close(torch.tensor(vector), ref, atol=1e-4, rtol=0)
