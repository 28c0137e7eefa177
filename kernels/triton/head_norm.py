"""The q/k head norms: an RMSNorm over each attention head of q and of k (rows of head_dim), all
heads of both in one launch, read from views of the qkv projection (any token/head strides):

- `gemma_qk_norm`: Gemma 3's, with Gemma's (1 + w) weights (fp32, rounded once: transformers'
  GemmaRMSNorm, as in gemma_norm.py);
- `qk_rms_norm`: Qwen3's and Qwen3-MoE's, with plain RMSNorm weights (HF's rounding: the normalised
  row rounded to the input dtype, then times the weight): one launch a layer instead of two
  `rms_norm` launches; with `rms_input`, the q/k of a folded input norm's raw stream.

One program per token head; fp32 statistics. Twins: kernels/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def _head_norm_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    q_w_ptr,  # [D]
    k_w_ptr,  # [D]
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, Hkv, D] contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    eps,
    rms_ptr,  # [T, H] (HAS_RMS)
    stride_rt,
    hidden,
    rms_eps,
    HAS_RMS: tl.constexpr,  # folded input norm: normalise s * x, return the result / s
    BLOCK_H: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    PLAIN: tl.constexpr,  # w * round(x / rms) (reference.rms_norm), else x / rms * (1 + w) (Gemma)
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    # Program `head` < HQ normalises q's head, the others k's head (head - HQ): both loads are
    # issued, one of them fully masked (no memory access), so the program has no branch.
    is_q = head < HQ
    is_k = head >= HQ
    kh = tl.maximum(head - HQ, 0)
    qh = tl.minimum(head, HQ - 1)
    xq = tl.load(q_ptr + t * stride_qt + qh * stride_qh + offs, mask=mask & is_q, other=0.0)
    xk = tl.load(k_ptr + t * stride_kt + kh * stride_kh + offs, mask=mask & is_k, other=0.0)
    wq = tl.load(q_w_ptr + offs, mask=mask & is_q, other=0.0).to(tl.float32)
    wk = tl.load(k_w_ptr + offs, mask=mask & is_k, other=0.0).to(tl.float32)
    xf = xq.to(tl.float32) + xk.to(tl.float32)
    s = 1.0
    if HAS_RMS:  # (the h row in one load where it fits: it overlaps the q/k loads)
        cols = tl.arange(0, BLOCK_H)
        sum_sq = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            hv = tl.load(rms_ptr + t * stride_rt + h0 + cols, mask=h0 + cols < hidden, other=0.0).to(
                tl.float32
            )
            sum_sq += hv * hv
        s = tl.rsqrt(tl.sum(sum_sq, axis=0) / hidden + rms_eps)
        xf = xf * s
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    if PLAIN:
        normed = (xf * inv_rms).to(q_out_ptr.dtype.element_ty).to(tl.float32)
        out = (normed * (wq + wk) / s).to(q_out_ptr.dtype.element_ty)
    else:
        out = (xf * inv_rms * (1.0 + wq + wk) / s).to(q_out_ptr.dtype.element_ty)
    tl.store(q_out_ptr + (t * HQ + qh) * D + offs, out, mask=mask & is_q)
    tl.store(k_out_ptr + (t * HKV + kh) * D + offs, out, mask=mask & is_k)
    pdl.leave(PDL)


def gemma_qk_norm(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, Hq, D], k [T, Hkv, D] (rows of each head contiguous, any token/head strides, e.g.
    views of the qkv projection), q_weight, k_weight [D], eps) -> (gemma_rms_norm(q, q_weight),
    gemma_rms_norm(k, k_weight)), new contiguous tensors, in one launch."""
    return _qk_norm(q, k, q_weight, k_weight, eps, plain=False)


def qk_rms_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    rms_input: torch.Tensor | None = None,
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gemma_qk_norm's layout with plain RMSNorm weights: (rms_norm(q, q_weight), rms_norm(k,
    k_weight)) per head, in one launch; with `rms_input`, a folded input norm's raw-stream q/k
    (reference.qk_rms_norm)."""
    return _qk_norm(q, k, q_weight, k_weight, eps, True, rms_input, rms_eps)


def _qk_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    plain: bool,
    rms_input: torch.Tensor | None = None,
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], (
        q.shape,
        k.shape,
    )
    assert q.stride(2) == 1 and k.stride(2) == 1 and q.dtype == k.dtype, (q.stride(), k.stride())
    num_tokens, num_q, head_dim = q.shape
    num_kv = k.shape[1]
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block = triton.next_power_of_2(head_dim)
    assert rms_input is None or (rms_input.shape[0] == num_tokens and rms_input.stride(1) == 1)
    hidden = rms_input.shape[1] if rms_input is not None else 0
    _head_norm_kernel[(num_tokens, num_q + num_kv)](
        q,
        k,
        q_weight,
        k_weight,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        eps,
        rms_input if rms_input is not None else q,
        rms_input.stride(0) if rms_input is not None else 0,
        hidden,
        rms_eps,
        HAS_RMS=rms_input is not None,
        BLOCK_H=min(4096, triton.next_power_of_2(max(hidden, 16))),
        HQ=num_q,
        HKV=num_kv,
        D=head_dim,
        BLOCK=block,
        PLAIN=plain,
        num_warps=min(4, max(1, block // 128)),
        **pdl.launch_options(q.device),
    )
    return q_out, k_out
