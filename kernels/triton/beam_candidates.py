"""Beam search's candidate selection per request in one launch: the second stage of
services/worker/beam_select.py (`select_beams`) when no candidate is banned and every request has
the same number of live beams.

Program g takes its request's W beam rows' top PB candidates (each row's values best first, from
`row_topk`), adds each row's cumulative logprob (float64, as the torch path promotes), and picks
the KEEP best by KEEP rounds of (max, lowest place holding it), the place being beam x PB + rank:
a stable descending sort's order, as `select_beams`' sort. It writes the candidate table (total,
place, token, logprob) and the next beams: the first W candidates whose token is not one of the
request's stop ids, best first (parent = place // PB, token, total); columns past the last such
candidate are 0 (a request with fewer going on finishes or is not launched ahead: they only have
to be in range). The torch ops it replaces: an add, a sort, two gathers, a stack, a division and,
with stop ids, a comparison, a sort and three more gathers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def select_candidates(
    values_ptr,
    ids_ptr,
    scores_ptr,
    stops_ptr,
    table_ptr,
    parents_ptr,
    tokens_ptr,
    totals_ptr,
    g,
    stride_v,
    stride_i,
    num_stops,
    W: tl.constexpr,
    PB: tl.constexpr,
    KEEP: tl.constexpr,
    C_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    W_PAD: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Request g's selection (the module docstring), also beam_topk_candidates.py's, which reads
    rows other programs wrote past L1: CACHE ".cg" for the values and ids."""
    place = tl.arange(0, C_PAD)
    alive = place < W * PB
    row = g * W + place // PB
    rank = place % PB
    value = tl.load(values_ptr + row * stride_v + rank, mask=alive, other=float("-inf"), cache_modifier=CACHE)
    token = tl.load(ids_ptr + row * stride_i + rank, mask=alive, other=0, cache_modifier=CACHE)
    total = tl.load(scores_ptr + row, mask=alive, other=0.0) + value.to(tl.float64)
    s = tl.arange(0, S_PAD)
    stops = tl.load(stops_ptr + g * num_stops + s, mask=s < num_stops, other=-1)
    going = tl.zeros([], tl.int32)
    for j in range(KEEP):
        best = tl.max(tl.where(alive, total, float("-inf")), axis=0)
        at = tl.min(tl.where(alive & (total == best), place, C_PAD), axis=0)
        alive = alive & (place != at)
        picked = place == at
        tok = tl.sum(tl.where(picked, token, 0), axis=0)
        logprob = tl.sum(tl.where(picked, value, 0.0), axis=0)
        out = table_ptr + (g * KEEP + j) * 4
        tl.store(out, best)
        tl.store(out + 1, at.to(tl.float64))
        tl.store(out + 2, tok.to(tl.float64))
        tl.store(out + 3, logprob.to(tl.float64))
        goes = (tl.sum((stops == tok).to(tl.int32), axis=0) == 0) & (going < W)
        tl.store(parents_ptr + g * W + going, (at // PB).to(tl.int64), mask=goes)
        tl.store(tokens_ptr + g * W + going, tok, mask=goes)
        tl.store(totals_ptr + g * W + going, best, mask=goes)
        going += goes.to(tl.int32)
    w = tl.arange(0, W_PAD)
    rest = (w >= going) & (w < W)
    tl.store(parents_ptr + g * W + w, tl.zeros([W_PAD], tl.int64), mask=rest)
    tl.store(tokens_ptr + g * W + w, tl.zeros([W_PAD], tl.int64), mask=rest)
    tl.store(totals_ptr + g * W + w, tl.zeros([W_PAD], tl.float64), mask=rest)


# the strides and the number of stop ids vary with the step's batch: one compiled kernel for all
@triton.jit(do_not_specialize=["stride_v", "stride_i", "num_stops"])
def _beam_candidates_kernel(
    values_ptr,  # [G * W, >= PB] fp32, row stride stride_v
    ids_ptr,  # [G * W, >= PB] int64, row stride stride_i
    scores_ptr,  # [G * W] fp64
    stops_ptr,  # [G, num_stops] int64 (-1: none)
    table_ptr,  # [G, KEEP, 4] fp64
    parents_ptr,  # [G, W] int64
    tokens_ptr,  # [G, W] int64
    totals_ptr,  # [G, W] fp64
    stride_v,
    stride_i,
    num_stops,
    W: tl.constexpr,
    PB: tl.constexpr,
    KEEP: tl.constexpr,
    C_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    W_PAD: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    select_candidates(
        values_ptr,
        ids_ptr,
        scores_ptr,
        stops_ptr,
        table_ptr,
        parents_ptr,
        tokens_ptr,
        totals_ptr,
        g,
        stride_v,
        stride_i,
        num_stops,
        W,
        PB,
        KEEP,
        C_PAD,
        S_PAD,
        W_PAD,
        "",
    )


def beam_candidates(
    values: torch.Tensor,  # [G * W, >= per_beam] fp32: each beam row's top values, best first
    ids: torch.Tensor,  # [G * W, >= per_beam] int64: their token ids
    scores: torch.Tensor,  # [G * W] fp64: each row's cumulative logprob
    stops: torch.Tensor,  # [G, S] int64 stop ids per request, -1 padded (S may be 0)
    width: int,  # W: beam rows per request
    per_beam: int,  # PB: candidates per row considered
    keep: int,  # KEEP <= W * PB: candidates in the table
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table [G, keep, 4] fp64: total, place, token, logprob, best first; parents, tokens [G, W]
    int64 and totals [G, W] fp64 of the first W candidates not ending in a stop id)."""
    rows = values.shape[0]
    assert rows % width == 0 and values.stride(1) == 1 and ids.stride(1) == 1, (values.shape, width)
    assert 0 < keep <= width * per_beam and per_beam <= values.shape[1], (keep, width, per_beam)
    groups = rows // width
    device = values.device
    table = torch.empty((groups, keep, 4), dtype=torch.float64, device=device)
    parents = torch.empty((groups, width), dtype=torch.int64, device=device)
    tokens = torch.empty((groups, width), dtype=torch.int64, device=device)
    totals = torch.empty((groups, width), dtype=torch.float64, device=device)
    if groups == 0:
        return table, parents, tokens, totals
    num_stops = stops.shape[1] if stops.dim() == 2 else 0
    _beam_candidates_kernel[(groups,)](
        values,
        ids,
        scores,
        stops if num_stops else ids,  # (not read without stop ids)
        table,
        parents,
        tokens,
        totals,
        values.stride(0),
        ids.stride(0),
        num_stops,
        W=width,
        PB=per_beam,
        KEEP=keep,
        C_PAD=max(16, triton.next_power_of_2(width * per_beam)),
        S_PAD=max(16, triton.next_power_of_2(max(num_stops, 1))),
        W_PAD=max(16, triton.next_power_of_2(width)),
        num_warps=4,
    )
    return table, parents, tokens, totals
