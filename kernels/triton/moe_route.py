"""Mixture-of-experts routing in one launch: router logits [T, E] -> each token's k experts and
routing weights (reference twin: kernels/reference.moe_route).

One program per token holds the row's E logits in registers and picks the k largest by k
max-reductions (ties to the lower expert id), so a step's routing is one small kernel instead of
torch's softmax, radix/bitonic sort, top-k gather and division kernels. No host synchronisation:
CUDA-graph capturable.

Folded norm (`rms_input`): the router's weight holds the post-attention norm's weight and read the
raw residual stream h, so its logits are rms(h) times the normalised input's; the kernel reads h's
row, computes its 1/rms and scales the logits by it before scoring: the norm costs no launch.

Router in the kernel (`moe_router`, reference twin reference.moe_router; decode-sized steps): the
router GEMV (E <= 128 experts x hidden) read by programs over (16-expert tile, K split), about one
wave, so its fraction of a MB streams at bandwidth (cuBLAS's tile for a 1-row GEMM with N = 128
is a few CTAs, each walking all of K: docs/benchmarks.md); each stores its partial logits, and the last program to arrive (an
arrival counter, as decode_attention.py's split merge) sums them in split order, adds the bias,
rounds to x's dtype as F.linear's logits, applies the folded norm's 1/rms (from the x tiles the
expert-tile-0 programs loaded) and routes every token. One launch a layer instead of a GEMM and
the routing kernel; CUDA-graph capturable (fixed grid per shape, the counter resets itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.reference import MOE_SCORINGS
from kernels.triton import pdl
from kernels.triton.arrival_counters import arrival_counters


@triton.jit
def _select_top_k(
    v,  # [BLOCK_E] fp32 logits, -inf past num_experts
    experts,  # tl.arange(0, BLOCK_E)
    valid,  # experts < num_experts
    num_experts,
    TOP_K: tl.constexpr,
    SOFTMAX_FIRST: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
):
    """(weights [BLOCK_TOPK] fp32, ids [BLOCK_TOPK] int32) of one token, slots past TOP_K zero:
    the k largest by k max-reductions (ties to the lower expert id), scored as reference.moe_route."""
    if SOFTMAX_FIRST:
        e = tl.exp(v - tl.max(v, axis=0))  # padding: exp(-inf) = 0
        v = tl.where(valid, e / tl.sum(e, axis=0), float("-inf"))
    slots = tl.arange(0, BLOCK_TOPK)
    top = tl.full([BLOCK_TOPK], float("-inf"), tl.float32)
    top_ids = tl.zeros([BLOCK_TOPK], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(v, axis=0)
        # (a NaN row matches nothing: the clamp keeps the id a real expert, never an address past
        # the weights, so a diverged sequence cannot fault the step every other request is in)
        best_id = tl.minimum(tl.min(tl.where(v == best, experts, BLOCK_E), axis=0), num_experts - 1)
        top = tl.where(slots == j, best, top)
        top_ids = tl.where(slots == j, best_id, top_ids)
        v = tl.where(experts == best_id, float("-inf"), v)
    slot_ok = slots < TOP_K
    if SOFTMAX_FIRST:
        weights = tl.where(slot_ok, top, 0.0)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, axis=0)
    else:
        e = tl.where(slot_ok, tl.exp(top - tl.max(top, axis=0)), 0.0)
        weights = e / tl.sum(e, axis=0)
    return weights, top_ids


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [T, E]
    weights_ptr,  # [T, TOP_K] fp32
    ids_ptr,  # [T, TOP_K] int64
    rms_ptr,  # [T, H] raw residual stream (HAS_RMS)
    num_experts,
    stride_lt,
    hidden,
    stride_rt,
    rms_eps,
    HAS_RMS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOP_K: tl.constexpr,
    SOFTMAX_FIRST: tl.constexpr,  # softmax_topk (else topk_softmax)
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    v = tl.load(logits_ptr + token * stride_lt + experts, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_RMS:
        cols = tl.arange(0, BLOCK_H)
        sum_sq = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            x = tl.load(rms_ptr + token * stride_rt + h0 + cols, mask=h0 + cols < hidden, other=0.0)
            sum_sq += x.to(tl.float32) * x.to(tl.float32)
        v = v * tl.rsqrt(tl.sum(sum_sq, axis=0) / hidden + rms_eps)
    weights, top_ids = _select_top_k(
        v, experts, valid, num_experts, TOP_K, SOFTMAX_FIRST, RENORMALIZE, BLOCK_E, BLOCK_TOPK
    )
    slots = tl.arange(0, BLOCK_TOPK)
    slot_ok = slots < TOP_K
    tl.store(weights_ptr + token * TOP_K + slots, weights, mask=slot_ok)
    tl.store(ids_ptr + token * TOP_K + slots, top_ids.to(tl.int64), mask=slot_ok)


def moe_route(
    logits: torch.Tensor,  # [T, E]
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    rms_input: torch.Tensor | None = None,  # [T, H]: scale each row's logits by its 1/rms first
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, k] fp32, ids [T, k] int64)
    """reference.moe_route in one launch (module docstring)."""
    if scoring not in MOE_SCORINGS:
        raise ValueError(f"unknown MoE scoring {scoring!r} (one of {', '.join(MOE_SCORINGS)})")
    num_tokens, num_experts = logits.shape
    assert 0 < top_k <= num_experts and logits.stride(1) == 1, (top_k, logits.shape, logits.stride())
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    assert rms_input is None or (rms_input.shape[0] == num_tokens and rms_input.stride(1) == 1)
    block_e = triton.next_power_of_2(num_experts)
    hidden = rms_input.shape[1] if rms_input is not None else 0
    _moe_route_kernel[(num_tokens,)](
        logits, weights, ids, rms_input if rms_input is not None else logits, num_experts, logits.stride(0),
        hidden, rms_input.stride(0) if rms_input is not None else 0, rms_eps,
        HAS_RMS=rms_input is not None, BLOCK_H=min(1024, triton.next_power_of_2(max(hidden, 16))),
        TOP_K=top_k, SOFTMAX_FIRST=scoring == "softmax_topk", RENORMALIZE=renormalize,
        BLOCK_E=block_e, BLOCK_TOPK=triton.next_power_of_2(top_k),
        num_warps=1 if block_e <= 256 else 4,
    )  # fmt: skip
    return weights, ids


# The router GEMV in the routing kernel (`moe_router`) serves up to this many tokens (the decode
# graph buckets': fused_moe.DECODE_MAX_TOKENS and above); its dot pads the tokens to this many rows.
ROUTER_MAX_TOKENS = 16
# Expert rows a program reads (a tensor-core dot's smallest N) and the K tile; programs over
# (expert tile, K split) until about one wave of programs reads the weight, at most MAX_SPLITS
# K splits (the last program sums a [splits, experts] fp32 tile per token in registers).
ROUTER_TILE_E = 16
ROUTER_BLOCK_K = 128
ROUTER_TARGET_PROGRAMS = 128
ROUTER_MAX_SPLITS = 32


@triton.jit
def _moe_router_kernel(
    x_ptr,  # [T, H] (HAS_RMS: the raw residual stream, the folded norm's weight in w)
    w_ptr,  # [E, H] router weight
    bias_ptr,  # [E] (HAS_BIAS)
    part_ptr,  # [SPLITS, BLOCK_T, BLOCK_E] fp32: each K split's partial logits
    sq_ptr,  # [SPLITS, BLOCK_T] fp32: each K split's partial sum of x^2 (HAS_RMS)
    counter_ptr,  # [1] int32, zero between launches: programs that finished phase 1
    weights_ptr,  # [T, TOP_K] fp32
    ids_ptr,  # [T, TOP_K] int64
    num_tokens,
    num_experts,
    hidden,
    stride_xt,
    stride_we,
    k_per_split,  # a multiple of BLOCK_K
    rms_eps,
    HAS_BIAS: tl.constexpr,
    HAS_RMS: tl.constexpr,
    TOP_K: tl.constexpr,
    SOFTMAX_FIRST: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    TILE_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    PDL: tl.constexpr,
):
    # phase 1: program (expert tile, K split) streams its [TILE_E, k_per_split] slice of the
    # router weight against every token's x (rows padded to a dot's 16) and stores the partial
    # logits; the programs of expert tile 0 also store the partial sums of x^2 (the folded norm's
    # 1/rms) from the x tiles they load anyway
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    e = tile * TILE_E + tl.arange(0, TILE_E)
    e_ok = e < num_experts
    kk = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, hidden)
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xt
    w_base = w_ptr + e[:, None].to(tl.int64) * stride_we
    # The split's first weight tile before the PDL wait (every split has one): the router's weight
    # is no kernel's output, so its read may overlap the previous kernel's tail; x, that kernel's
    # output, only after the wait (pdl.py's rules). (ieee: fp32 inputs stay fp32, not TF32, which
    # could reorder close experts; bf16 runs its MMA either way.)
    k = k_start + kk
    k_ok = k < k_end
    w = tl.load(w_base + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.enter(PDL)
    x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    acc = tl.dot(x, tl.trans(w), tl.zeros([BLOCK_T, TILE_E], dtype=tl.float32), input_precision="ieee")
    if HAS_RMS:  # (two loop copies, as fused_moe's gate_up: no dead loop-carried sum)
        sum_sq = x.to(tl.float32) * x.to(tl.float32)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            k = k0 + kk
            k_ok = k < k_end
            x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            sum_sq += x.to(tl.float32) * x.to(tl.float32)
        tl.store(sq_ptr + split * BLOCK_T + rows, tl.sum(sum_sq, axis=1), mask=row_ok & (tile == 0))
    else:
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            k = k0 + kk
            k_ok = k < k_end
            x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    part_rows = (split * BLOCK_T + rows).to(tl.int64) * BLOCK_E
    tl.store(part_ptr + part_rows[:, None] + e[None, :], acc, mask=row_ok[:, None] & e_ok[None, :])

    # phase 2: the last program to finish sums the splits in split order (deterministic whatever
    # the arrival order) and routes every token: no second launch. Every thread's partial stores
    # are ordered before the counter's release by the barrier; the acquire side reads the
    # partials past L1 (.cg) (decode_attention.py's split merge).
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
        splits = tl.arange(0, BLOCK_S)
        s_ok = splits < tl.num_programs(1)
        experts = tl.arange(0, BLOCK_E)
        valid = experts < num_experts
        slots = tl.arange(0, BLOCK_TOPK)
        slot_ok = slots < TOP_K
        if HAS_BIAS:
            bias = tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
        for t in range(0, num_tokens):
            parts = tl.load(
                part_ptr + (splits[:, None] * BLOCK_T + t).to(tl.int64) * BLOCK_E + experts[None, :],
                mask=s_ok[:, None] & valid[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            v = tl.sum(parts, axis=0)
            if HAS_BIAS:
                v += bias
            # rounded to x's dtype as F.linear's logits are (the unfused path's numerics)
            v = v.to(x_ptr.dtype.element_ty).to(tl.float32)
            if HAS_RMS:
                sq = tl.load(sq_ptr + splits * BLOCK_T + t, mask=s_ok, other=0.0, cache_modifier=".cg")
                v = v * tl.rsqrt(tl.sum(sq, axis=0) / hidden + rms_eps)
            v = tl.where(valid, v, float("-inf"))
            weights, top_ids = _select_top_k(
                v, experts, valid, num_experts, TOP_K, SOFTMAX_FIRST, RENORMALIZE, BLOCK_E, BLOCK_TOPK
            )
            tl.store(weights_ptr + t * TOP_K + slots, weights, mask=slot_ok)
            tl.store(ids_ptr + t * TOP_K + slots, top_ids.to(tl.int64), mask=slot_ok)
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (next layer, next step)
    pdl.leave(PDL)


@dataclass(frozen=True)
class RouterGrid:
    """How `moe_router` splits the router weight: expert tiles x K splits of k_per_split columns."""

    expert_tiles: int
    splits: int
    k_per_split: int


def router_grid(num_experts: int, hidden: int) -> RouterGrid:
    """About ROUTER_TARGET_PROGRAMS programs, each a whole number of K tiles, no empty split
    (Qwen3-30B-A3B's 128 x 2048: 8 x 16 programs of one 16 x 128 tile; gpt-oss-20b's 32 x 2880:
    2 x 23; Mixtral's 8 x 4096: 1 x 16 programs of two tiles)."""
    expert_tiles = triton.cdiv(num_experts, ROUTER_TILE_E)
    k_tiles = triton.cdiv(hidden, ROUTER_BLOCK_K)
    splits = max(1, min(ROUTER_MAX_SPLITS, k_tiles, triton.cdiv(ROUTER_TARGET_PROGRAMS, expert_tiles)))
    k_per_split = triton.cdiv(k_tiles, splits) * ROUTER_BLOCK_K
    return RouterGrid(expert_tiles, triton.cdiv(hidden, k_per_split), k_per_split)


def moe_router(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H] the router's weight (replicated under tensor parallelism)
    bias: torch.Tensor | None,  # [E] (gpt-oss)
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream (reference.moe_router)
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, k] fp32, ids [T, k] int64)
    """reference.moe_router: for up to ROUTER_MAX_TOKENS tokens one launch, the router GEMV and
    the routing (module docstring); more tokens: F.linear, then `moe_route`."""
    if scoring not in MOE_SCORINGS:
        raise ValueError(f"unknown MoE scoring {scoring!r} (one of {', '.join(MOE_SCORINGS)})")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    assert weight.shape == (num_experts, hidden) and 0 < top_k <= num_experts, (x.shape, weight.shape, top_k)
    if num_tokens == 0 or num_tokens > ROUTER_MAX_TOKENS:
        logits = F.linear(x, weight, bias)
        if rms_eps is None:
            return moe_route(logits, top_k, scoring, renormalize)
        return moe_route(logits, top_k, scoring, renormalize, rms_input=x, rms_eps=rms_eps)
    assert x.stride(1) == 1 and weight.stride(1) == 1, (x.stride(), weight.stride())
    assert bias is None or bias.is_contiguous(), "router bias must be contiguous"
    device = x.device
    grid = router_grid(num_experts, hidden)
    block_e = triton.next_power_of_2(num_experts)
    parts = torch.empty((grid.splits, ROUTER_MAX_TOKENS, block_e), dtype=torch.float32, device=device)
    sums = torch.empty((grid.splits, ROUTER_MAX_TOKENS), dtype=torch.float32, device=device)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
    _moe_router_kernel[(grid.expert_tiles, grid.splits)](
        x, weight, bias if bias is not None else weight, parts, sums, arrival_counters("moe_router", device, 1), weights, ids,
        num_tokens, num_experts, hidden, x.stride(0), weight.stride(0), grid.k_per_split,
        rms_eps if rms_eps is not None else 0.0,
        HAS_BIAS=bias is not None, HAS_RMS=rms_eps is not None, TOP_K=top_k,
        SOFTMAX_FIRST=scoring == "softmax_topk", RENORMALIZE=renormalize,
        BLOCK_T=ROUTER_MAX_TOKENS, TILE_E=ROUTER_TILE_E, BLOCK_K=ROUTER_BLOCK_K, BLOCK_E=block_e,
        BLOCK_S=triton.next_power_of_2(grid.splits), BLOCK_TOPK=triton.next_power_of_2(top_k),
        num_warps=4, **pdl.launch_options(device),
    )  # fmt: skip
    return weights, ids
