"""Fused mixture-of-experts feed-forward. Two paths, one reference twin (kernels/reference.fused_moe).

Decode (T <= DECODE_MAX_TOKENS): two weight-streaming GEMV launches, no sorting (fused_moe_decode):

    gate_up: a[t*k + j] = w[t, j] * act(x[t] @ w13[e].T (+ b13[e]))  per (pair, 16 outputs) [T*k, I]
    down:    out[t] = sum_j a[t*k + j] @ w2[e_j].T (+ sum_j w[t, j] b2[e_j])  per (token, 16 cols)

with the tile configs `moe_tune.tune_moe` measured at engine start (else default_decode_configs).

Prefill (more tokens): tokens sorted by expert, one grouped-GEMM launch per projection for all
experts.

    align:   the T*k (token, slot) pairs sorted by expert, each expert's run padded to BLOCK_M
             (`sorted_ids`, sentinel T*k in the padding; `block_expert` per BLOCK_M block, -1 past
             the end). Device ops with shapes fixed by (T, k, E, BLOCK_M): no host sync, so a
             decode step stays CUDA-graph capturable.
    gemm 1:  h[p] = x[p // k] @ w13[e].T (+ b13[e]) for every sorted pair p   [T*k, 2I]
    act:     silu(h[:, :I]) * h[:, I:] (or gpt-oss's clamped SwiGLU)         [T*k, I]
    gemm 2:  y[p] = w[p] * (act[p] @ w2[e].T (+ b2[e]))                      [T*k, H]
    combine: out[t] = sum_j y[t*k + j]                                   [T, H]

Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows (fp32 accumulation); up to
64 pairs an expert on average take BLOCK_M = 16, more take 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton.arrival_counters import arrival_counters
from kernels.triton.silu_and_mul import silu_and_mul


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P] int32, block_expert [P // block_m] int32) for P = T*k + E*(block_m - 1)
    rounded up to block_m: the pairs of each expert contiguous and padded to a block boundary."""
    flat = topk_ids.flatten().to(torch.int64)  # [T*k]
    num_pairs = flat.numel()
    max_padded = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    # scatter_add, not bincount: CUDA's bincount reads the input's maximum back to the host, which
    # a CUDA graph capture refuses
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pair indices sorted by expert
    expert_of = flat[order]
    count_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=flat.device) - count_start[expert_of]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids, block_expert


# Up to this many (token, slot) pairs the alignment is one Triton program (`align_small`) instead
# of torch's scatter_add / cumsum / argsort / index / searchsorted kernels: the decode graph
# buckets above DECODE_MAX_TOKENS (Qwen3-30B-A3B: up to 64 tokens); prefill keeps torch's.
ALIGN_SMALL_MAX_PAIRS = 512


@triton.jit
def _align_kernel(
    ids_ptr,  # [P] expert of each pair
    sorted_ids_ptr,  # [S] int32 out
    block_expert_ptr,  # [S // BLOCK_M] int32 out
    num_pairs,
    num_experts,
    num_slots,  # S
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,  # pairs a pass step reads
    BLOCK_S: tl.constexpr,  # slots / blocks a fill step writes
):
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    chunk = tl.arange(0, CHUNK)
    # pass 1: pairs per expert -> each expert's run, padded to BLOCK_M
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        e = tl.load(ids_ptr + p0 + chunk, mask=p0 + chunk < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    # every slot the sentinel; each block its expert (searchsorted(padded_end, start, right=True))
    slots = tl.arange(0, BLOCK_S)
    for s0 in range(0, num_slots, BLOCK_S):
        tl.store(
            sorted_ids_ptr + s0 + slots,
            tl.zeros([BLOCK_S], tl.int32) + num_pairs,
            mask=s0 + slots < num_slots,
        )
    for b0 in range(0, num_slots // BLOCK_M, BLOCK_S):
        starts = (b0 + slots) * BLOCK_M
        ended = (padded_end[None, :] <= starts[:, None]) & expert_ok[None, :]
        block_expert = tl.sum(ended.to(tl.int32), axis=1)
        block_expert = tl.where(block_expert < num_experts, block_expert, -1)
        tl.store(block_expert_ptr + b0 + slots, block_expert, mask=starts < num_slots)
    # the sentinel stores above before the scatter below (one program: a CTA barrier orders them)
    tl.debug_barrier()
    # pass 2: each pair to its expert's run, in pair order (torch's stable argsort)
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # pairs of each expert placed so far
    for p0 in range(0, num_pairs, CHUNK):
        pair_ok = p0 + chunk < num_pairs
        e = tl.load(ids_ptr + p0 + chunk, mask=pair_ok, other=-1).to(tl.int32)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        earlier = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs before it in the chunk
        dest = tl.sum(onehot * (earlier + seen[None, :] + padded_start[None, :]), axis=1)
        tl.store(sorted_ids_ptr + dest, p0 + chunk, mask=pair_ok)
        seen += tl.sum(onehot, axis=0)


def align_small(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_by_expert's result in one single-program launch (for <= ALIGN_SMALL_MAX_PAIRS pairs)."""
    flat = topk_ids.flatten().contiguous()
    num_pairs = flat.numel()
    num_slots = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.empty((num_slots,), dtype=torch.int32, device=flat.device)
    block_expert = torch.empty((num_slots // block_m,), dtype=torch.int32, device=flat.device)
    block_e = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](
        flat, sorted_ids, block_expert, num_pairs, num_experts, num_slots,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, 4096 // block_e), BLOCK_S=max(16, 4096 // block_e),
        num_warps=8,
    )  # fmt: skip
    return sorted_ids, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [M_a, K]
    b_ptr,  # [E, N, K]
    c_ptr,  # [num_pairs, N]
    weights_ptr,  # [num_pairs] fp32 (MUL_WEIGHTS)
    bias_ptr,  # [E, N] (HAS_BIAS)
    sorted_ids_ptr,  # [P] int32
    block_expert_ptr,  # [P // BLOCK_M] int32
    num_pairs,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_bias_e,
    A_ROWS_PER_PAIR: tl.constexpr,  # top_k: row of a = pair // top_k (gemm 1); 1: row = pair (gemm 2)
    MUL_WEIGHTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = pairs // A_ROWS_PER_PAIR
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:  # inside the projection, before the routing weight
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_WEIGHTS:
        w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    num_pairs: int,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    a_rows_per_pair: int,
    weights: torch.Tensor | None,
    block_m: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    assert a.is_contiguous() and b.is_contiguous() and b.dim() == 3
    n, k = b.shape[1], b.shape[2]
    assert a.shape[1] == k, (a.shape, b.shape)
    assert bias is None or (bias.shape == b.shape[:2] and bias.stride(1) == 1), (bias, b.shape)
    c = torch.empty((num_pairs, n), dtype=a.dtype, device=a.device)
    block_n = 64
    block_k = 32 if k >= 32 else 16
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, bias if bias is not None else c,
        sorted_ids, block_expert, num_pairs, n, k, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        bias.stride(0) if bias is not None else 0,
        A_ROWS_PER_PAIR=a_rows_per_pair, MUL_WEIGHTS=weights is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return c


# Token counts up to this take the decode path (the decode graph buckets' row range; as the skinny
# GEMM's MAX_ROWS): per-pair GEMVs with no sorting (module docstring).
DECODE_MAX_TOKENS = 8
_ACTIVATION_IDS = {"silu": 0, "swiglu_oai": 1}


@dataclass(frozen=True)
class DecodeConfig:
    """Tile config of the decode kernels (`default_decode_configs`, or what moe_tune measured)."""

    block_n: int  # weight rows a program streams (gate_up: half gate rows, half up rows)
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    # down only: programs sharing one output tile's K loop, the last to finish sums their
    # partials (_moe_down_kernel); a power of two
    split: int = 1

    def __str__(self) -> str:
        extra = f",split{self.split}" if self.split > 1 else ""
        return f"n{self.block_n},k{self.block_k},w{self.num_warps},s{self.num_stages}{extra}"


DecodeKey = tuple[int, int, int, int, torch.dtype, bool]  # (E, I, H, top_k, dtype, has_bias)
# what moe_tune.tune_moe measured fastest per expert shape (absent: default_decode_configs)
DECODE_CHOICE: dict[DecodeKey, tuple[DecodeConfig, DecodeConfig]] = {}


def decode_key(w13: torch.Tensor, top_k: int, has_bias: bool) -> DecodeKey:
    experts, two_inter, hidden = w13.shape
    return (experts, two_inter // 2, hidden, top_k, w13.dtype, has_bias)


def default_decode_configs(hidden: int, inter: int) -> tuple[DecodeConfig, DecodeConfig]:
    """(gate_up, down) configs where nothing was tuned. Both kernels are weight streams: 16 weight
    rows (down) or 16 outputs (gate_up: 32 rows) a program give >= 128 programs at batch 1 for the
    shapes served (Qwen3-30B-A3B's down: 2048 / 16 = 128; its gate_up: 8 pairs x 768 / 16 = 384),
    256-wide K tiles are 16-byte loads of whole rows, 4 stages keep 32-64 KB a program in flight
    (as the dense skinny GEMM's best configs). K tiles shrink to the next power of two for tiny
    test shapes."""
    gate_up = DecodeConfig(block_n=32, block_k=max(16, min(256, triton.next_power_of_2(hidden))))
    down = DecodeConfig(block_n=16, block_k=max(16, min(256, triton.next_power_of_2(inter))))
    return gate_up, down


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, K]
    w13_ptr,  # [E, 2*I, K]
    bias_ptr,  # [E, 2*I] (HAS_BIAS)
    ids_ptr,  # [T * TOP_K] expert of each (token, slot) pair
    weights_ptr,  # [T * TOP_K] fp32 routing weights
    act_ptr,  # [T * TOP_K, I]: w * act(gate, up) of each pair
    INTER,
    K,
    stride_xt,
    stride_we,
    stride_wn,
    stride_be,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RMS: tl.constexpr,  # folded norm: x is the raw residual stream, gate/up scaled by its 1/rms
    RMS_EPS: tl.constexpr,  # (one value per model: a constant, not a float argument)
    ACTIVATION: tl.constexpr,  # 0: silu(gate) * up; 1: gpt-oss's clamped SwiGLU
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # pairs vary fastest: the programs of one N-tile run together, so two tokens routed to the
    # same expert read its tile once from memory and once from L2
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = (pair // TOP_K).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    HALF: tl.constexpr = BLOCK_N // 2
    j = tl.arange(0, BLOCK_N)
    out_j = pid_n * HALF + j % HALF
    col_ok = out_j < INTER
    w_rows = out_j + (j // HALF) * INTER  # HALF gate rows, then their up rows
    rows = tl.arange(0, 16)  # the one input row, padded to a tensor-core dot's 16
    kk = tl.arange(0, BLOCK_K)
    x_base = x_ptr + token * stride_xt + rows[:, None] * 0
    w_base = w13_ptr + expert * stride_we + w_rows[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    if HAS_RMS:
        # folded norm: the token's sum of squares from the x tiles the GEMV loads anyway, then
        # (x @ (W * g).T) / rms(x) == (x / rms(x) * g) @ W.T (the norm's weight is in w13).
        # (Two copies of the loop: a dead loop-carried sum in the plain one breaks the sm_90
        # compile under the interpreter, tests/kernels/test_fused_moe.py.)
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            x = tl.load(x_base + k[None, :], mask=(rows[:, None] == 0) & k_ok[None, :], other=0.0)
            w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            sum_sq += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=0)  # (rows 1.. are zeros)
        acc = acc * tl.rsqrt(tl.sum(sum_sq, axis=0) / K + RMS_EPS)
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            x = tl.load(x_base + k[None, :], mask=(rows[:, None] == 0) & k_ok[None, :], other=0.0)
            w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + w_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gate, up = tl.split(tl.permute(tl.reshape(acc, [16, 2, HALF]), (0, 2, 1)))  # [16, HALF]
    if ACTIVATION == 0:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        act = (up + 1.0) * (gate / (1.0 + tl.exp(-ALPHA * gate)))
    # the routing weight here, in fp32 before the one rounding: the down kernel then sums the k
    # experts' products in one accumulator
    act = act * tl.load(weights_ptr + pair)
    out_cols = pid_n * HALF + tl.arange(0, HALF)
    tl.store(
        act_ptr + pair.to(tl.int64) * INTER + rows[:, None] * 0 + out_cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=(rows[:, None] == 0) & (out_cols < INTER)[None, :],
    )


@triton.jit
def _moe_down_kernel(
    act_ptr,  # [T * TOP_K, I]: w * act of each pair (the routing weight applied)
    w2_ptr,  # [E, N, I]
    bias_ptr,  # [E, N] (HAS_BIAS)
    ids_ptr,  # [T * TOP_K]
    weights_ptr,  # [T * TOP_K] fp32 (HAS_BIAS: the bias is weighted too)
    out_ptr,  # [T, N]
    residual_ptr,  # [T, N] (HAS_RESIDUAL)
    part_ptr,  # [SPLIT, T, N] fp32: each split's partial sums (SPLIT > 1)
    counter_ptr,  # [>= T * N-tiles] int32, zero between launches (SPLIT > 1)
    N,
    INTER,
    stride_we,
    stride_wn,
    stride_be,
    stride_ot,
    stride_rt,
    TOP_K: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # folded norm: out = residual + the experts' sum, rounded once
    SPLIT: tl.constexpr,  # programs sharing one (token, N-tile)'s K loop (a power of two)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[t, n] = sum_j sum_i act[t*k + j, i] * w2[e_j, n, i]: one GEMV over the k experts' rows
    # laid end to end (K = k * I), one loop so the weight stream stays pipelined across experts.
    # SPLIT > 1: program (token, N-tile, split) runs a 1/SPLIT slice of that loop, so more
    # programs (and more loads in flight) stream the same weight; the last of the SPLIT to finish
    # sums the partials in split order (deterministic) and writes the output.
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    slots = tl.arange(0, BLOCK_TOPK)
    slot_ok = slots < TOP_K
    experts = tl.load(ids_ptr + token * TOP_K + slots, mask=slot_ok, other=0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    tiles = tl.cdiv(INTER, BLOCK_K)
    it_start = 0
    it_end = TOP_K * tiles
    if SPLIT > 1:
        per_split = tl.cdiv(TOP_K * tiles, SPLIT)
        it_start = tl.program_id(2) * per_split
        it_end = tl.minimum(it_start + per_split, TOP_K * tiles)
    rows = tl.arange(0, 16)
    a_base = act_ptr + token * TOP_K * INTER + rows[:, None] * 0
    w_rows = w2_ptr + cols[:, None].to(tl.int64) * stride_wn
    acc16 = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for it in range(it_start, it_end):
        j = it // tiles
        k = (it - j * tiles) * BLOCK_K + kk
        k_ok = k < INTER
        # the expert from registers, not memory (a load here would cut the pipeline's depth), and
        # times stride_we after the sum so that the offset keeps the stride's divisibility: 16-byte
        # async copies of the weights need it
        expert = tl.sum(tl.where(slots == j, experts, 0), axis=0)
        a = tl.load(a_base + j * INTER + k[None, :], mask=(rows[:, None] == 0) & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + expert * stride_we + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc16 = tl.dot(a, tl.trans(w), acc16)
    acc = tl.sum(acc16, axis=0)  # [BLOCK_N] (rows 1.. are zeros)
    last = True
    if SPLIT > 1:
        split = tl.program_id(2)
        tl.store(part_ptr + (split * tl.num_programs(0) + token) * N + cols, acc, mask=col_ok)
        # every thread's partial stores before the counter's release (decode_attention.py's merge)
        tl.debug_barrier()
        counter = counter_ptr + token * tl.num_programs(1) + pid_n
        last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
        if last:
            parts = tl.load(
                part_ptr + (tl.arange(0, SPLIT)[:, None] * tl.num_programs(0) + token) * N + cols[None, :],
                mask=col_ok[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            acc = tl.sum(parts, axis=0)
            tl.atomic_xchg(counter, 0)  # ready for the next launch (next layer, next step)
    if last:
        if HAS_BIAS:
            rw = tl.load(weights_ptr + token * TOP_K + slots, mask=slot_ok, other=0.0)
            bias_rows = (
                tl.load(ids_ptr + token * TOP_K + slots, mask=slot_ok, other=0).to(tl.int64) * stride_be
            )
            bias = tl.load(
                bias_ptr + bias_rows[:, None] + cols[None, :],
                mask=slot_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(bias.to(tl.float32) * rw[:, None], axis=0)
        if HAS_RESIDUAL:
            acc += tl.load(residual_ptr + token * stride_rt + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def launch_gate_up(
    x: torch.Tensor,  # [T, H] contiguous
    w13: torch.Tensor,
    w13_bias: torch.Tensor | None,
    ids: torch.Tensor,  # [T*k] contiguous
    weights: torch.Tensor,  # [T*k] fp32 contiguous
    act: torch.Tensor,  # [T*k, I] output
    top_k: int,
    activation: str,
    config: DecodeConfig,
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream
) -> None:
    inter = act.shape[1]
    _moe_gate_up_kernel[(ids.numel(), triton.cdiv(inter, config.block_n // 2))](
        x, w13, w13_bias if w13_bias is not None else w13, ids, weights, act,
        inter, x.shape[1], x.stride(0), w13.stride(0), w13.stride(1),
        w13_bias.stride(0) if w13_bias is not None else 0,
        TOP_K=top_k, HAS_BIAS=w13_bias is not None, HAS_RMS=rms_eps is not None,
        RMS_EPS=rms_eps if rms_eps is not None else 0.0,
        ACTIVATION=_ACTIVATION_IDS[activation],
        ALPHA=reference.SWIGLU_ALPHA, LIMIT=reference.SWIGLU_LIMIT,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def launch_down(
    act: torch.Tensor,  # [T*k, I]: launch_gate_up's output
    w2: torch.Tensor,
    w2_bias: torch.Tensor | None,
    ids: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,  # [T, H] output
    top_k: int,
    config: DecodeConfig,
    residual: torch.Tensor | None = None,  # [T, H], stride 1 along H
) -> None:
    num_tokens, hidden = out.shape
    assert residual is None or (residual.shape == out.shape and residual.stride(1) == 1)
    n_tiles = triton.cdiv(hidden, config.block_n)
    assert config.split & (config.split - 1) == 0, f"split {config.split}: a power of two"
    parts, counters = out, ids  # (unused unless split)
    if config.split > 1:
        parts = torch.empty((config.split, num_tokens, hidden), dtype=torch.float32, device=out.device)
        counters = arrival_counters("moe_down", out.device, num_tokens * n_tiles)
    _moe_down_kernel[(num_tokens, n_tiles, config.split)](
        act, w2, w2_bias if w2_bias is not None else w2, ids, weights, out,
        residual if residual is not None else out, parts, counters,
        hidden, act.shape[1], w2.stride(0), w2.stride(1),
        w2_bias.stride(0) if w2_bias is not None else 0, out.stride(0),
        residual.stride(0) if residual is not None else 0,
        TOP_K=top_k, BLOCK_TOPK=triton.next_power_of_2(top_k), HAS_BIAS=w2_bias is not None,
        HAS_RESIDUAL=residual is not None, SPLIT=config.split,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def fused_moe_decode(
    x: torch.Tensor,  # [T, H], T small
    w13: torch.Tensor,  # [E, 2*I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: str = "silu",
    configs: tuple[DecodeConfig, DecodeConfig] | None = None,  # (gate_up, down); None: tuned or default
    rms_eps: float | None = None,
    residual: torch.Tensor | None = None,  # [T, H]
) -> torch.Tensor:  # [T, H]
    """The decode path: two launches, no sorting, no separate activation or combine kernels.

    gate_up: one program per (pair, 16 outputs) streams 16 gate and 16 up rows of the pair's
    expert against the token's row; its epilogue adds the bias, applies the activation and the
    routing weight and writes w * act [T*k, I] (x's dtype). down: one program per (token, 16
    output columns) streams those columns of its k experts' down rows against the k weighted
    activations, adds the weighted biases and writes the token's output once (a fixed sum order:
    deterministic, no atomics, no zero-fill).

    Folded norm (`rms_eps`, `residual`: reference.fused_moe): gate_up computes the token's 1/rms
    from the x tiles it streams and scales its accumulator by it; down adds the residual stream in
    its epilogue. The post-attention norm then costs no launch and the residual add none."""
    num_tokens, top_k = topk_ids.shape
    two_inter, hidden = w13.shape[1:]
    inter = two_inter // 2
    assert w13.is_contiguous() and w2.is_contiguous(), "stacked expert weights must be contiguous"
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if configs is None:
        key = decode_key(w13, top_k, w13_bias is not None)
        configs = DECODE_CHOICE.get(key) or default_decode_configs(hidden, inter)
    act = torch.empty((num_tokens * top_k, inter), dtype=x.dtype, device=x.device)
    launch_gate_up(x, w13, w13_bias, ids, weights, act, top_k, activation, configs[0], rms_eps)
    launch_down(act, w2, w2_bias, ids, weights, out, top_k, configs[1], residual)
    return out


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2*I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    w13_bias: torch.Tensor | None = None,  # [E, 2*I]
    w2_bias: torch.Tensor | None = None,  # [E, H]
    activation: str = "silu",  # "silu" | "swiglu_oai" (reference.moe_activation)
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream (reference.fused_moe)
    residual: torch.Tensor | None = None,  # [T, H], added to the output
) -> torch.Tensor:  # [T, H]
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    assert w2.shape[0] == num_experts and w13.shape[2] == x.shape[1] and w2.shape[2] * 2 == w13.shape[1]
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"unknown MoE activation {activation!r} (one of {', '.join(_ACTIVATION_IDS)})")
    if num_tokens <= DECODE_MAX_TOKENS:
        return fused_moe_decode(
            x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation, None, rms_eps, residual
        )
    if rms_eps is not None:  # (the folded forward runs decode-sized steps; any size stays correct)
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + rms_eps)).to(x.dtype)
    block_m = 16 if num_tokens * top_k <= 64 * num_experts else 64
    align = align_small if num_tokens * top_k <= ALIGN_SMALL_MAX_PAIRS else align_by_expert
    sorted_ids, block_expert = align(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    x = x.contiguous()
    h = _grouped_gemm(x, w13, num_pairs, sorted_ids, block_expert, top_k, None, block_m, w13_bias)
    # [T*k, 2I] -> [T*k, I]; gpt-oss's clamped SwiGLU as eager torch ops (elementwise, small
    # next to the GEMMs)
    act = silu_and_mul(h) if activation == "silu" else reference.moe_activation(h, activation)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = _grouped_gemm(act, w2, num_pairs, sorted_ids, block_expert, 1, weights, block_m, w2_bias)
    out = y.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32)
    return (out if residual is None else out + residual.float()).to(x.dtype)
