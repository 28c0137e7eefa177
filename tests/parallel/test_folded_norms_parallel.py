"""Folded RMSNorms (models/llama.py `fold_norms`) in a tensor-parallel group: each rank folds the
norm weights into its rows of qkv_proj / gate_up_proj, and the row-parallel o_proj / down_proj add
the residual stream on rank 0 only, before their all-reduce (layers/linear.py
`RowParallelLinear.linear_add`). On the CPU with the Triton bundle (TRITON_INTERPRET=1, set by
tests/conftest.py: the SiLU kernel runs on the interpreter, the GEMMs take their fallbacks) in
fp32, a T = 2 group's greedy tokens equal T = 1's (folded too) and transformers', logprobs close.
The model's norms are random, so folding multiplies by something other than ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.request import SamplingParams
from tests.parallel.conftest import GroupRun
from tests.worker.worker_testlib import (
    TINY,
    RefModel,
    load_ref,
    prompts_of_lengths,
    randomize_norms_and_biases,
)

# (the Triton interpreter's own warning, once per kernel launch)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5]  # 8 in flight; the long ones chunked (budget 16)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def folded_llama(tmp_path_factory: pytest.TempPathFactory) -> RefModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    pytest.importorskip("triton")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=2, tie_word_embeddings=False))
    randomize_norms_and_biases(hf, seed=11)
    path = tmp_path_factory.mktemp("tp-folded-llama")
    hf.save_pretrained(str(path), max_shard_size="100KB")
    return load_ref(path)


def test_t2_folded_norms_equal_t1_and_transformers(folded_llama: RefModel, tmp_path: Path) -> None:
    ref = folded_llama
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=5)
    options = ["--model", str(ref.path), "--device", "cpu", "--kv-cache-memory", "4MiB"]
    options += ["--max-num-batched-tokens", "16", "--cpu-threads", "1", "--attention-backend", "triton"]
    group = GroupRun(
        tmp_path,
        {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 3},
        *options,
        "--tensor-parallel-size",
        "2",
    )
    # T = 1 (Triton bundle, folded) and transformers while the group runs
    single = ref.engine(attention_backend="triton", kv_cache_memory="4MiB", max_num_batched_tokens=16)
    assert single.ops.name == "triton" and single.runner.model.norms_folded
    base = single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3))
    got = group.result()
    assert got["norms_folded"], "the T = 2 group kept its norms separate"
    assert got["used_blocks"] == 0
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        expected, hf_logprobs = ref.greedy_with_logprobs(prompt, MAX_TOKENS)
        assert result.token_ids[0] == expected, f"T=1: prompt of {len(prompt)}"
        assert got["tokens"][i]["0"] == expected, f"T=2: prompt of {len(prompt)}"
        ours = got["logprobs"][i]
        single_lps = [lp.logprob for lp in result.logprobs[0]]
        assert max(abs(a - b) for a, b in zip(ours, single_lps, strict=True)) < 1e-4
        theirs = [float(step[token]) for step, token in zip(hf_logprobs, expected, strict=True)]
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4
        top_ids = [[t for t, _ in step] for step in got["top"][i]]
        assert top_ids == [[t for t, _ in lp.top] for lp in result.logprobs[0]]
