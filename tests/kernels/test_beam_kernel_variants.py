"""The beam step's Triton kernels compile once per beam width, not once per batch or length.

Triton specializes an integer argument by default (a variant for the value 1, one for multiples of
16, one for the rest), and a beam step's sizes and strides change with its batch and its
sequences' lengths: every new combination compiled on the engine thread mid-serving (tens of ms
each, stalling every request in the batch). Each kernel here runs over batches and lengths that
hit all three cases of every such argument: after its first call, none may compile another
variant. GPU only: the interpreter compiles nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu


def compiled(kernel: Any) -> int:
    """How many variants of `kernel` are compiled for the current device."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def test_beam_ahead_compiles_once_over_batches_and_lengths() -> None:
    from kernels.triton.beam_ahead import _beam_ahead_kernel, beam_ahead

    width = 4
    first = None
    for groups, w_prev, max_blocks in [(1, 1, 1), (2, 7, 9), (4, 16, 16), (3, 33, 48), (8, 17, 31)]:
        gen = torch.Generator().manual_seed(groups * 100 + w_prev)
        parents = torch.randint(0, width, (groups, width), generator=gen).cuda()
        tokens = torch.randint(0, 1000, (groups, width), generator=gen).cuda()
        slots = torch.randint(1, 99, (groups, width, w_prev), generator=gen, dtype=torch.int32).cuda()
        places = torch.arange(groups * width).cuda()
        shared = torch.randint(0, min(w_prev + 1, max_blocks), (groups * width,), generator=gen).cuda()
        tails = torch.randint(100, 200, (groups * width,), generator=gen).cuda()
        tables, _, ids = beam_ahead(parents, tokens, slots, places, shared, tails, max_blocks)
        assert tables.shape == (groups * width, max_blocks) and torch.equal(ids, tokens.view(-1))
        first = first or compiled(_beam_ahead_kernel)
        assert compiled(_beam_ahead_kernel) == first, (groups, w_prev, max_blocks)


def test_beam_candidates_compiles_once_over_batches_and_stop_ids() -> None:
    from kernels.triton.beam_candidates import _beam_candidates_kernel, beam_candidates

    width, per_beam = 4, 8
    first = None
    for groups, num_stops, row_stride in [(1, 1, 8), (2, 3, 16), (5, 16, 8), (3, 0, 17), (8, 2, 32)]:
        rows = groups * width
        values = torch.randn(rows, row_stride, device="cuda").sort(dim=1, descending=True).values
        ids = torch.randint(0, 1000, (rows, row_stride), device="cuda")
        scores = torch.randn(rows, device="cuda", dtype=torch.float64)
        stops = torch.full((groups, num_stops), 5, dtype=torch.int64, device="cuda")
        table, parents, tokens, _ = beam_candidates(values, ids, scores, stops, width, per_beam, 2 * width)
        assert table.shape == (groups, 2 * width, 4) and parents.shape == tokens.shape == (groups, width)
        first = first or compiled(_beam_candidates_kernel)
        assert compiled(_beam_candidates_kernel) == first, (groups, num_stops, row_stride)


def test_row_topk_compiles_once_per_k_over_vocabularies() -> None:
    from kernels.triton.row_topk import _topk_chunks_kernel, _topk_merge_kernel, row_topk

    first = None
    # 3 or 4 chunks of 4,096: the merge's candidates pad to 32 at k = 8 (a constexpr) in each case
    for rows, vocab in [
        (1, 4096 * 3),
        (4, 4096 * 3 + 1),
        (16, 4096 * 4),
        (7, 4096 * 3 + 5),
        (2, 4096 * 4 - 16),
    ]:
        values = torch.randn(rows, vocab, device="cuda")
        got, idx = row_topk(values, 8)
        assert torch.equal(got, values.topk(8, dim=1).values) and idx.shape == (rows, 8)
        first = first or (compiled(_topk_chunks_kernel), compiled(_topk_merge_kernel))
        assert (compiled(_topk_chunks_kernel), compiled(_topk_merge_kernel)) == first, (rows, vocab)
