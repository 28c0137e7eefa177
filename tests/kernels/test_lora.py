"""The segmented multi-LoRA kernels (shrink then expand) against their reference twins: decode-
and prefill-sized batches mixing several adapters with rows of the base model, empty slots, one
adapter for the whole batch, and a batch of base rows only (nothing may change)."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for

from kernels import reference

# (rows, in features K, out features N, rank R, slots S)
# (the 1100-column case splits K over three shrink programs, the last one partial; the 4700-column
# one over ten, which the expand kernel loads in two chunks, the second partial)
SHAPES = [
    (1, 64, 96, 16, 4),
    (5, 32, 48, 8, 3),
    (37, 64, 160, 48, 4),
    (70, 48, 32, 16, 2),
    (3, 1100, 40, 16, 2),
    (2, 4700, 24, 16, 3),
]
MIXES = ["mixed", "one-adapter", "base-only"]


def _slots(rows: int, num_slots: int, mix: str, rng: random.Random) -> list[int]:
    if mix == "one-adapter":
        return [num_slots - 1] * rows
    if mix == "base-only":
        return [-1] * rows
    # slot 0 never used: an empty segment in the middle of the pool
    return [rng.choice([-1, *range(1, num_slots)]) for _ in range(rows)]


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_shrink_expand_match_reference(
    device: str, dtype: torch.dtype, mix: str, shape: tuple[int, int, int, int, int]
) -> None:
    skip_without(device)
    from kernels.triton.lora import lora_expand, lora_shrink

    rows, k, n, rank, num_slots = shape
    rng = random.Random(repr((shape, mix)))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(num_slots, rank, k, generator=gen) / k**0.5).to(device, dtype)
    lora_b = (torch.randn(num_slots, n, rank, generator=gen) / rank**0.5).to(device, dtype)
    y0 = torch.randn(rows, n, generator=gen).to(device, dtype)
    token_slots = _slots(rows, num_slots, mix, rng)
    ids, starts, lens = (
        torch.tensor(v, dtype=torch.int32, device=device)
        for v in reference.lora_segments(token_slots, num_slots)
    )

    t = lora_shrink(x, lora_a, ids, starts, lens)
    t_ref = reference.lora_shrink(x, lora_a, ids, starts, lens)
    lora_rows = torch.tensor([s >= 0 for s in token_slots], device=device)
    if lora_rows.any():
        assert rel_err(t.sum(0)[lora_rows], t_ref.sum(0)[lora_rows]) < tol_for(dtype)

    y = y0.clone()
    lora_expand(y, t, lora_b, ids, starts, lens)  # the kernel's own partial sums
    y_ref = y0.clone()
    reference.lora_expand(y_ref, t_ref, lora_b, ids, starts, lens)
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol_for(dtype), (shape, mix)
    assert torch.equal(y[~lora_rows], y0[~lora_rows])  # base rows untouched
    # And the whole update against the plain definition, row by row, in float64.
    want = y0.double().clone()
    for i, s in enumerate(token_slots):
        if s >= 0:
            want[i] += (x[i].double() @ lora_a[s].double().T) @ lora_b[s].double().T
    assert rel_err(y, want) < 4 * tol_for(dtype)


def test_segments_group_rows_by_slot() -> None:
    ids, starts, lens = reference.lora_segments([2, -1, 0, 2, -1, 0], num_slots=3)
    assert ids == [2, 5, 0, 3, 1, 4] and starts == [0, 2, 2] and lens == [2, 0, 2]


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("parts", [(0, 40, 56), (0, 48)])
def test_fused_parts_read_only_their_rank_columns(
    device: str, dtype: torch.dtype, parts: tuple[int, ...]
) -> None:
    """A fused projection (qkv: three parts, gate/up: two): output columns of part j use only rank
    columns [j*R, (j+1)*R) of B, whatever the other entries hold (the pool keeps them zero)."""
    skip_without(device)
    from kernels.triton.lora import lora_expand, lora_shrink

    rows, k, part_rank, num_slots = 9, 48, 8, 3
    n = 72 if len(parts) == 3 else 96
    rank = part_rank * len(parts)
    gen = torch.Generator().manual_seed(len(parts))
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(num_slots, rank, k, generator=gen) / k**0.5).to(device, dtype)
    lora_b = torch.randn(num_slots, n, rank, generator=gen).to(device, dtype)  # no zeros anywhere
    y0 = torch.randn(rows, n, generator=gen).to(device, dtype)
    token_slots = [0, 2, -1, 1, 2, 2, 0, -1, 1]
    ids, starts, lens = (
        torch.tensor(v, dtype=torch.int32, device=device)
        for v in reference.lora_segments(token_slots, num_slots)
    )
    t = lora_shrink(x, lora_a, ids, starts, lens)
    y, y_ref = y0.clone(), y0.clone()
    lora_expand(y, t, lora_b, ids, starts, lens, parts, part_rank)
    reference.lora_expand(y_ref, t, lora_b, ids, starts, lens, parts, part_rank)
    assert rel_err(y, y_ref) < tol_for(dtype)
    want = y0.double().clone()
    bounds = [*parts, n]
    for i, s in enumerate(token_slots):
        if s < 0:
            continue
        for j in range(len(parts)):
            cols, ranks = slice(bounds[j], bounds[j + 1]), slice(j * part_rank, (j + 1) * part_rank)
            t_j = x[i].double() @ lora_a[s, ranks].double().T
            want[i, cols] += t_j @ lora_b[s, cols, ranks].double().T
    assert rel_err(y, want) < 4 * tol_for(dtype)
