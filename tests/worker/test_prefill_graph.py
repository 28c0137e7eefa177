"""Piecewise prefill graphs (services/worker/prefill_graph.py): what runs without a GPU.

The graphs themselves (capture, replay, agreement with the eager forward on seven families) are
tested on the GPU: tests/kernels/test_engine_gpu.py::test_prefill_graphs_on_and_off_agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.config import WorkerConfig
from services.worker.layers import attention
from services.worker.prefill_graph import MIN_TOKENS, token_ladder

SHARED = Path(__file__).resolve().parents[3] / "shared"


@pytest.mark.parametrize("max_tokens", [17, 32, 100, 2048, 8192, 3000])
def test_the_ladder_covers_every_step_size_with_bounded_padding(max_tokens: int) -> None:
    sizes = token_ladder(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens and sizes[0] >= min(32, max_tokens)
    for tokens in range(MIN_TOKENS + 1, max_tokens + 1):
        bucket = next(s for s in sizes if s >= tokens)
        # padding: fewer rows than a quarter of the step's, or than one 32-row step
        assert bucket - tokens < max(tokens / 4, 32), (tokens, bucket)
    assert len(sizes) <= 4 * max_tokens.bit_length()  # (capture time: a few buckets a power of two)


def test_no_ladder_at_or_below_the_decode_sized_steps() -> None:
    assert token_ladder(MIN_TOKENS) == [] and token_ladder(0) == []


def test_no_capture_is_in_progress_outside_start_up() -> None:
    assert attention.piece_cut() is None


def test_the_flag_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError, match="--prefill-graph-max-tokens"):
        WorkerConfig(model=str(SHARED / "models" / "stories260K"), prefill_graph_max_tokens=-1)


def test_a_cpu_engine_runs_prompts_eagerly_and_says_why() -> None:
    from services.worker.engine import Engine

    engine = Engine(WorkerConfig(model=str(SHARED / "models" / "stories260K"), device="cpu"))
    assert engine.runner.prefill_graphs is None
    assert engine.runner.prefill_graphs_off  # (not captured: graphs are CUDA only)
