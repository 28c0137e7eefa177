"""Beam search's whole selection in one launch: row_topk.py's two stages and beam_candidates.py's
candidate selection, each later stage done by the last program of the earlier one to finish
(arrival counters, as decode_attention.py's split merge), so a beam step pays one launch for it
instead of three, and none of the intermediate outputs.

Program (row, chunk) runs row_topk's `chunk_topk` into a scratch of [rows, chunks, K]; the last
chunk of a row to finish runs its `merge_row` (the row's top K, equal values in index order: the
`values`, `ids` outputs); the last row of a request to finish runs beam_candidates'
`select_candidates` over its W rows' first PB values: those modules' own code. Each stage's stores
are ordered before its counter's release by a barrier, and the next stage reads them past L1
(.cg). The results are those of row_topk followed by beam_candidates, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.arrival_counters import arrival_counters
from kernels.triton.beam_candidates import select_candidates
from kernels.triton.row_topk import BLOCK, chunk_topk, merge_row

_SCRATCH: dict[torch.device, torch.Tensor] = {}


# sizes, strides and the number of stop ids vary with the step: one compiled kernel per (W, PB, K, KEEP)
@triton.jit(do_not_specialize=["vocab", "stride_x", "num_chunks", "num_stops"])
def _beam_topk_candidates_kernel(
    x_ptr,  # [G * W, V] fp32 log-softmax rows, row stride stride_x
    part_val_ptr,  # [G * W, P, K] fp32 scratch
    part_idx_ptr,  # [G * W, P, K] int32 scratch (V where a chunk has fewer than K values)
    row_counter_ptr,  # [G * W] int32 arrival counters (zeros between launches)
    group_counter_ptr,  # [G] int32
    val_ptr,  # [G * W, K] fp32: each row's top K, best first
    idx_ptr,  # [G * W, K] int64
    scores_ptr,  # [G * W] fp64
    stops_ptr,  # [G, num_stops] int64 (-1: none)
    table_ptr,  # [G, KEEP, 4] fp64
    parents_ptr,  # [G, W] int64
    tokens_ptr,  # [G, W] int64
    totals_ptr,  # [G, W] fp64
    vocab,
    stride_x,
    num_chunks,
    num_stops,
    W: tl.constexpr,
    K: tl.constexpr,
    PB: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
    M_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    W_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunk_topk(x_ptr, part_val_ptr, part_idx_ptr, row, chunk, vocab, stride_x, num_chunks, K, BLOCK)
    tl.debug_barrier()
    arrived = tl.atomic_add(row_counter_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == num_chunks - 1:  # the row's last chunk: the row's top K
        merge_row(part_val_ptr, part_idx_ptr, val_ptr, idx_ptr, row, vocab, num_chunks * K, K, M_PAD, ".cg")
        tl.atomic_xchg(row_counter_ptr + row, 0)  # ready for the next launch
        tl.debug_barrier()
        g = row // W
        rows_done = tl.atomic_add(group_counter_ptr + g, 1, sem="acq_rel", scope="gpu")
        if rows_done == W - 1:  # the request's last row: its candidates
            select_candidates(
                val_ptr,
                idx_ptr,
                scores_ptr,
                stops_ptr,
                table_ptr,
                parents_ptr,
                tokens_ptr,
                totals_ptr,
                g,
                K,
                K,
                num_stops,
                W,
                PB,
                KEEP,
                C_PAD,
                S_PAD,
                W_PAD,
                ".cg",
            )
            tl.atomic_xchg(group_counter_ptr + g, 0)


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    """[numel] int32-sized words of scratch on `device`, the same buffer every call (written and
    read within one launch; a device's launches run one at a time on its stream)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(max(numel, 1 << 16), dtype=torch.int32, device=device)
    return buf


def beam_topk_candidates(
    values: torch.Tensor,  # [G * W, V] fp32: the log-softmax rows of the groups' beams, in order
    scores: torch.Tensor,  # [G * W] fp64: each row's cumulative logprob
    stops: torch.Tensor,  # [G, S] int64 stop ids per request, -1 padded (S may be 0)
    width: int,  # W: beam rows per request
    k: int,  # each row's top k computed (returned: per_beam, or more for the client's logprobs)
    per_beam: int,  # PB <= k: candidates per row considered
    keep: int,  # KEEP <= W * PB: candidates in the table
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row values [G * W, k] fp32 and ids [G * W, k] int64, best first, equal values in index
    order: row_topk's; table [G, keep, 4] fp64, parents, tokens [G, W] int64, totals [G, W] fp64:
    beam_candidates' on the first per_beam of each row) in one launch."""
    rows, vocab = values.shape
    assert values.stride(1) == 1 and values.dtype == torch.float32, (values.stride(), values.dtype)
    assert rows % width == 0 and 0 < per_beam <= k <= vocab, (rows, width, per_beam, k, vocab)
    assert 0 < keep <= width * per_beam, (keep, width, per_beam)
    groups = rows // width
    device = values.device
    out_val = torch.empty((rows, k), dtype=torch.float32, device=device)
    out_idx = torch.empty((rows, k), dtype=torch.int64, device=device)
    # one fp64 allocation for the table and the totals, one int64 for the parents and tokens
    floats = torch.empty(groups * (keep * 4 + width), dtype=torch.float64, device=device)
    ints = torch.empty((2, groups, width), dtype=torch.int64, device=device)
    table = floats[: groups * keep * 4].view(groups, keep, 4)
    totals = floats[groups * keep * 4 :].view(groups, width)
    parents, tokens = ints[0], ints[1]
    if groups == 0:
        return out_val, out_idx, table, parents, tokens, totals
    block = min(BLOCK, max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, block)
    scratch = _scratch(device, 2 * rows * num_chunks * k)
    part_val = scratch[: rows * num_chunks * k].view(torch.float32)
    part_idx = scratch[rows * num_chunks * k : 2 * rows * num_chunks * k]
    counters = arrival_counters("beam_topk_candidates", device, rows + groups)
    num_stops = stops.shape[1] if stops.dim() == 2 else 0
    _beam_topk_candidates_kernel[(rows, num_chunks)](
        values,
        part_val,
        part_idx,
        counters,
        counters[rows:],
        out_val,
        out_idx,
        scores,
        stops if num_stops else out_idx,  # (not read without stop ids)
        table,
        parents,
        tokens,
        totals,
        vocab,
        values.stride(0),
        num_chunks,
        num_stops,
        W=width,
        K=k,
        PB=per_beam,
        KEEP=keep,
        BLOCK=block,
        M_PAD=max(16, triton.next_power_of_2(num_chunks * k)),
        C_PAD=max(16, triton.next_power_of_2(width * per_beam)),
        S_PAD=max(16, triton.next_power_of_2(max(num_stops, 1))),
        W_PAD=max(16, triton.next_power_of_2(width)),
        num_warps=4,
    )
    return out_val, out_idx, table, parents, tokens, totals
