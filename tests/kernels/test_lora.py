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
    """A fused projection (qkv: three parts, gate/up: two): B holds each output column's own part's
    R ranks ([S, N, R], no zeros for the other parts), and output columns of part j use only the
    shrink's rank columns [j*R, (j+1)*R) (A's rows of part j)."""
    skip_without(device)
    from kernels.triton.lora import lora_expand, lora_shrink

    rows, k, part_rank, num_slots = 9, 48, 8, 3
    n = 72 if len(parts) == 3 else 96
    rank = part_rank * len(parts)
    gen = torch.Generator().manual_seed(len(parts))
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(num_slots, rank, k, generator=gen) / k**0.5).to(device, dtype)
    lora_b = torch.randn(num_slots, n, part_rank, generator=gen).to(device, dtype)
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
            want[i, cols] += t_j @ lora_b[s, cols].double().T
    assert rel_err(y, want) < 4 * tol_for(dtype)


def test_tile_grid_bounds_every_segmentation() -> None:
    """The grid's first axis (`max_tiles`) covers the row tiles of every way to split T rows over S
    slots, and is far smaller than the (slot, row block) grid it replaced where segments are short."""
    from kernels.triton.lora import _BLOCK_M, max_tiles

    rng = random.Random(0)
    for _ in range(2000):
        rows, num_slots = rng.randint(1, 300), rng.randint(1, 40)
        token_slots = [
            rng.choice([-1, *range(num_slots)][: rng.randint(1, num_slots + 1)]) for _ in range(rows)
        ]
        _, _, lens = reference.lora_segments(token_slots, num_slots)
        assert sum(-(-n // _BLOCK_M) for n in lens) <= max_tiles(rows, num_slots)
    # the worst case is reached: every slot's last tile partial
    lens = [_BLOCK_M + 1] * 3 + [1] * 5
    assert sum(-(-n // _BLOCK_M) for n in lens) == max_tiles(sum(lens), len(lens))
    # a decode batch of 64 over 16 adapters: 20 programs a column block, not 16 * 4
    assert max_tiles(64, 16) == 20 and max_tiles(1, 16) == 1


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(
    ("lens", "columns"),
    [
        ([4] * 16, 0),  # a decode batch's shape: 16 adapters of 4 rows (scaled down)
        ([0, 37, 0, 0, 1, 16, 0], 64),  # empty slots between, a segment of three tiles, one of one
        ([3, 0, 5], 48),  # columns per program not a multiple of the column block: rounded up
        ([1] * 5, 1000),  # one program covers every column
        ([5], 0),  # a pool of one slot (batch-1 benchmarks run --max-loras 1)
        ([2] * 20, 0),  # more slots than the lengths' first vector block
    ],
)
def test_tiles_and_columns_per_program(
    device: str, dtype: torch.dtype, lens: list[int], columns: int
) -> None:
    """Programs find their (slot, row tile) from the segment lengths, and an expand program may
    cover several column blocks: the shrink and the expand equal the reference twins for segment
    shapes that put tiles of one slot next to each other, skip empty slots, and leave programs
    past the last tile; the rows of no adapter stay as they were."""
    skip_without(device)
    from kernels.triton.lora import lora_expand, lora_shrink

    num_slots, k, n, rank = len(lens), 96, 200, 16
    rng = random.Random(repr(lens))
    token_slots = [s for s, count in enumerate(lens) for _ in range(count)] + [-1] * 3
    rng.shuffle(token_slots)
    rows = len(token_slots)
    gen = torch.Generator().manual_seed(len(lens))
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(num_slots, rank, k, generator=gen) / k**0.5).to(device, dtype)
    lora_b = (torch.randn(num_slots, n, rank, generator=gen) / rank**0.5).to(device, dtype)
    y0 = torch.randn(rows, n, generator=gen).to(device, dtype)
    ids, starts, seg_lens = (
        torch.tensor(v, dtype=torch.int32, device=device)
        for v in reference.lora_segments(token_slots, num_slots)
    )
    t = lora_shrink(x, lora_a, ids, starts, seg_lens)
    y = y0.clone()
    lora_expand(y, t, lora_b, ids, starts, seg_lens, columns=columns)
    y_ref = y0.clone()
    reference.lora_expand(
        y_ref, reference.lora_shrink(x, lora_a, ids, starts, seg_lens), lora_b, ids, starts, seg_lens
    )
    assert rel_err(y, y_ref) < tol_for(dtype)
    base = torch.tensor([s < 0 for s in token_slots], device=device)
    assert torch.equal(y[base], y0[base])


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_kernel_config_changes_launches_not_results(device: str, dtype: torch.dtype) -> None:
    """Another LoRA kernel config (the benchmark's A/B: K chunks of the shrink, columns per expand
    program, warps) computes the same update as the reference twins."""
    skip_without(device)
    from kernels.triton import lora

    rows, k, n, rank, num_slots = 21, 700, 300, 16, 5
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(num_slots, rank, k, generator=gen) / k**0.5).to(device, dtype)
    lora_b = (torch.randn(num_slots, n, rank, generator=gen) / rank**0.5).to(device, dtype)
    y0 = torch.randn(rows, n, generator=gen).to(device, dtype)
    token_slots = [i % (num_slots + 1) - 1 for i in range(rows)]
    ids, starts, lens = (
        torch.tensor(v, dtype=torch.int32, device=device)
        for v in reference.lora_segments(token_slots, num_slots)
    )
    y_ref = y0.clone()
    reference.lora_expand(
        y_ref, reference.lora_shrink(x, lora_a, ids, starts, lens), lora_b, ids, starts, lens
    )
    default = lora.config()
    lora.set_config(lora.LoRAKernelConfig.parse("k_chunk=128,expand_columns=256,num_warps=2"))
    try:
        t = lora.lora_shrink(x, lora_a, ids, starts, lens)
        y = y0.clone()
        lora.lora_expand(y, t, lora_b, ids, starts, lens)
        # a launch of at most SMALL_ROWS rows keeps the defaults (batch-1 decode stays as measured)
        small_map = reference.lora_segments(token_slots[: lora.SMALL_ROWS], num_slots)
        small = lora.lora_shrink(
            x[: lora.SMALL_ROWS],
            lora_a,
            *(torch.tensor(v, dtype=torch.int32, device=device) for v in small_map),
        )
    finally:
        lora.set_config(default)
    assert t.shape[0] == 6 and small.shape[0] == 2  # 700 columns in chunks of 128, of 512
    assert rel_err(y, y_ref) < tol_for(dtype)


def test_kernel_config_parse() -> None:
    from kernels.triton.lora import LoRAKernelConfig

    assert str(LoRAKernelConfig.parse("expand_columns=512")) == "k_chunk=512,expand_columns=512,num_warps=4"
    for bad in ("expand_colums=512", "k_chunk=0", "k_chunk=x", "num_warps"):
        with pytest.raises(ValueError, match="LoRA kernel config"):
            LoRAKernelConfig.parse(bad)
