"""--kv-cache-dtype fp8: the worker stores K/V as float8 e4m3 (a plain cast), holds more blocks in
the same memory, and generates close to the full-precision cache (kernel-level exactness against
the reference twins is in tests/kernels/test_fp8_kv_cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_testlib import prompts_of_lengths

from services.common.config import parse_config
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import SamplingParams


def _engine(model: Path, kv_cache_dtype: str) -> Engine:
    return Engine(
        WorkerConfig(
            model=str(model),
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_memory="4MiB",
            max_model_len=256,
            enable_prefix_caching=False,
        )
    )


def test_fp8_cache_generates_close_to_full_precision(stories_dir: Path) -> None:
    full, fp8 = _engine(stories_dir, "auto"), _engine(stories_dir, "fp8")
    assert full.kv_cache.tensor.dtype == torch.float32 and fp8.kv_cache.tensor.dtype == torch.float8_e4m3fn
    # The same bytes hold 4x the blocks of an fp32 cache (2x of a bf16 one).
    assert fp8.kv_cache.num_blocks == pytest.approx(4 * full.kv_cache.num_blocks, abs=4)
    prompts = prompts_of_lengths([6, 20, 9, 40], 512, seed=5)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
    diffs = []
    for a, b in zip(full.generate(prompts, sp), fp8.generate(prompts, sp), strict=True):
        ta, tb = a.token_ids[0], b.token_ids[0]
        same = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
        assert same >= 2, (ta, tb)  # K/V rounded to 1/16: the first greedy tokens agree
        diffs += [
            abs(x.logprob - y.logprob)
            for x, y in zip(a.logprobs[0][:same], b.logprobs[0][:same], strict=True)
        ]
    # ... and the chosen tokens' logprobs stay close while the outputs agree (a 260K-parameter
    # model with head_dim 8: q.k sums 8 terms, so the rounding averages out less than in real models)
    assert sum(diffs) / len(diffs) < 0.15, diffs
    assert fp8.block_manager.num_used_blocks == 0


def test_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(WorkerConfig, ["--model", "m"], "w").kv_cache_dtype == "auto"
    assert (
        parse_config(WorkerConfig, ["--model", "m", "--kv-cache-dtype", "fp8"], "w").kv_cache_dtype == "fp8"
    )
    with pytest.raises(SystemExit):
        parse_config(WorkerConfig, ["--model", "m", "--kv-cache-dtype", "int8"], "w")
    assert "--kv-cache-dtype: invalid choice 'int8'" in capsys.readouterr().err
