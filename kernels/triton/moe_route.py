"""Mixture-of-experts routing in one launch: router logits [T, E] -> each token's k experts and
routing weights (reference twin: kernels/reference.moe_route).

One program per token holds the row's E logits in registers and picks the k largest by k
max-reductions (ties to the lower expert id), so a step's routing is one small kernel instead of
torch's softmax, radix/bitonic sort, top-k gather and division kernels. No host synchronisation:
CUDA-graph capturable.

Folded norm (`rms_input`): the router's weight holds the post-attention norm's weight and read the
raw residual stream h, so its logits are rms(h) times the normalised input's; the kernel reads h's
row, computes its 1/rms and scales the logits by it before scoring: the norm costs no launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import MOE_SCORINGS


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
