"""The inputs of a beam step launched ahead (BeamStep.ahead, services/worker/beam_step.py) in
one launch: each entry's block table, the block its partly filled position is copied from, and
its input id.

New beam j of a request (an entry) goes on as its `j`-th live beam of the previous selection,
whose parent is `parents[g, j]`: its table is that parent's (`slot_tables[g, parent]`: the
table the parent ran with) cut or zero-padded to `max_blocks` columns, with its own `tail` block
at column `shared` (where its next position lands), and its input id is `tokens[g, j]`. In torch
that is a take, a 2-D gather of rows, a pad, a gather, a scatter, a cast, a second take and an
index_copy: eight launches and their host time on a step whose device work is a couple of ms
(docs/beam_search.md). Here program k writes entry k's row, the parent's block at `shared` (the
source of the partly filled block's copy, before the tail replaces it; 0 where the parent's table
has no such column) and its token at its row of the step's input ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C = 128  # table columns per loop step


# every size and stride varies with the step's batch and its sequences' lengths: one compiled
# kernel for all (Triton would otherwise compile a variant per value equal to 1 or divisible by 16)
@triton.jit(
    do_not_specialize=[
        "stride_pg",
        "stride_pw",
        "stride_tg",
        "stride_tw",
        "stride_sg",
        "stride_sw",
        "w_prev",
        "max_blocks",
        "W",
    ]
)
def _beam_ahead_kernel(
    parents_ptr,  # [G, W] int64
    tokens_ptr,  # [G, W] int64
    slot_ptr,  # [G, W, w_prev] int32 (last dim contiguous)
    places_ptr,  # [n] int64: g * W + j
    shared_ptr,  # [n] int64: the column of the entry's next position
    tails_ptr,  # [n] int64: the block written there
    positions_ptr,  # [n] int64: the entry's row in ids (HAS_POSITIONS)
    tables_ptr,  # out [n, max_blocks] int32
    src_ptr,  # out [n] int64
    ids_ptr,  # out [T] int64
    stride_pg,
    stride_pw,
    stride_tg,
    stride_tw,
    stride_sg,
    stride_sw,
    w_prev,
    max_blocks,
    W,
    HAS_POSITIONS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    place = tl.load(places_ptr + k)
    g = place // W
    j = place % W
    parent = tl.load(parents_ptr + g * stride_pg + j * stride_pw)
    token = tl.load(tokens_ptr + g * stride_tg + j * stride_tw)
    row = slot_ptr + g * stride_sg + parent * stride_sw
    shared = tl.load(shared_ptr + k)
    tail = tl.load(tails_ptr + k)
    src = tl.load(row + shared, mask=shared < w_prev, other=0)
    tl.store(src_ptr + k, src.to(tl.int64))
    for c0 in range(0, max_blocks, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(row + cols, mask=cols < w_prev, other=0)
        v = tl.where(cols == shared, tail.to(tl.int32), v)
        tl.store(tables_ptr + k * max_blocks + cols, v, mask=cols < max_blocks)
    pos = k
    if HAS_POSITIONS:
        pos = tl.load(positions_ptr + k)
    tl.store(ids_ptr + pos, token)


def beam_ahead(
    parents: torch.Tensor,  # [G, W] int64
    tokens: torch.Tensor,  # [G, W] int64
    slot_tables: torch.Tensor,  # [G, W, w_prev] int32
    places: torch.Tensor,  # [n] int64
    shared: torch.Tensor,  # [n] int64
    tails: torch.Tensor,  # [n] int64
    max_blocks: int,
    ids: torch.Tensor | None = None,  # [T] int64, written in place at `positions`
    positions: torch.Tensor | None = None,  # [n] int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tables [n, max_blocks] int32, src [n] int64, ids): see the module docstring. Without
    `ids`, ids is a new [n] tensor of the entries' tokens in entry order."""
    n = places.shape[0]
    G, W = parents.shape
    assert tokens.shape == (G, W) and slot_tables.shape[:2] == (G, W) and n > 0
    if slot_tables.stride(2) != 1:
        slot_tables = slot_tables.contiguous()
    device = places.device
    tables = torch.empty(n, max_blocks, dtype=torch.int32, device=device)
    src = torch.empty(n, dtype=torch.int64, device=device)
    if ids is None:
        assert positions is None
        ids = torch.empty(n, dtype=torch.int64, device=device)
    _beam_ahead_kernel[(n,)](
        parents,
        tokens,
        slot_tables,
        places,
        shared,
        tails,
        positions if positions is not None else places,
        tables,
        src,
        ids,
        parents.stride(0),
        parents.stride(1),
        tokens.stride(0),
        tokens.stride(1),
        slot_tables.stride(0),
        slot_tables.stride(1),
        slot_tables.shape[2],
        max_blocks,
        W,
        HAS_POSITIONS=positions is not None,
        BLOCK_C=BLOCK_C,
    )
    return tables, src, ids
