"""Quantized-weight GEMM: y = x @ dequant(W).T (+ b), the weight dequantized in registers.

Weight layouts are those of `kernels/reference.py` `quant_linear` (its twin): int8 [N, K]
symmetric (W8A16), or 4-bit packed two a byte along K into uint8 [N, K // 2] (W4A16, the layout
AWQ / GPTQ checkpoints are repacked to at load); scales [N, G] fp32 over groups of K // G
consecutive columns (G = 1: per output channel), optional zero points [N, G]. Each program loads
a [BLOCK_N, BLOCK_K] tile of quantized values, its scales (and zeros), turns it into the
activation dtype and feeds one tensor-core dot per K step into an fp32 accumulator; the output is
rounded once to the activation dtype. The weight bytes read are the quantized ones, which is what
a batch-1 decode step (bound by weight bytes) gains.

Two tile shapes of the one kernel: a skinny one for decode-sized inputs (M <= 16: one 16-row
block, wide N tiles, long K tiles to stream the weight) and a tiled one for prefill and large
batches (64 x 64 output tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SKINNY_MAX_ROWS = 16


@triton.jit
def _quant_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    num_groups,
    stride_xm,
    stride_wn,
    stride_ym,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wmask = mask_n[:, None] & mask_k[None, :]
        if BITS == 8:
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0)
            q = q.to(tl.float32)
        else:
            packed = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + (offs_k // 2)[None, :], mask=wmask, other=0
            )
            shift = ((offs_k % 2) * 4)[None, :]
            q = ((packed.to(tl.int32) >> shift) & 0xF).to(tl.float32)
        if GROUP_PER_TILE:  # the tile lies in one group: one scale (and zero) per row
            sg1 = offs_n * num_groups + k0 // group_size
            scale = tl.load(s_ptr + sg1, mask=mask_n, other=0.0)[:, None]
            if HAS_ZEROS:
                q = q - tl.load(z_ptr + sg1, mask=mask_n, other=0.0)[:, None]
        else:
            sg = offs_n[:, None] * num_groups + (offs_k // group_size)[None, :]
            scale = tl.load(s_ptr + sg, mask=wmask, other=0.0)
            if HAS_ZEROS:
                q = q - tl.load(z_ptr + sg, mask=wmask, other=0.0)
        if not HAS_ZEROS and BITS == 4:
            q = q - 8.0
        w = (q * scale).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): skinny for decode-sized inputs, else tiled."""
    if m <= SKINNY_MAX_ROWS:
        return 16, 64, 128, 4
    return 64, 64, 64, 4


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.reference.quant_linear`."""
    if bits not in (4, 8):
        raise ValueError(f"quant_linear: unsupported bits={bits} (8 or 4)")
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    num_groups = scales.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m, block_n, block_k, num_warps = _tiles(m)
    group_size = k // num_groups
    if group_size % block_k and block_k % 32 == 0 and group_size % 32 == 0:
        block_k = 32  # keep each K tile inside one group (one scale load per row and tile)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    scales = scales.float().contiguous()
    zeros_f = zeros.float().contiguous() if zeros is not None else scales
    _quant_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros_f,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        group_size,
        num_groups,
        x.stride(0),
        qweight.stride(0),
        y.stride(0),
        BITS=bits,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        GROUP_PER_TILE=group_size % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y
