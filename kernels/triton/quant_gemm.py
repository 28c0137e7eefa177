"""Quantized-weight GEMM: y = x @ dequant(W).T (+ b), the weight dequantized in registers, and the
per-shape choice of its tile config, made by timing the candidates on this GPU.

Weight layouts are those of `kernels/reference.py` `quant_linear` (its twin): int8 [N, K]
symmetric (W8A16), 4-bit packed two a byte along K into uint8 [N, K // 2] (W4A16, the layout AWQ /
GPTQ checkpoints are repacked to at load: even k in the low nibble), or float8 e4m3 [N, K] with one
scale per row (`fp8_weight_only`: FP8 weights against bf16 activations, the decode-sized candidate
of the FP8 tuner, fp8_gemm.py); scales [N, G] fp32 over groups of K // G consecutive columns (G = 1:
per output channel), optional zero points [N, G]. The weight bytes read are the quantized ones,
which is what a batch-1 decode step (bound by weight bytes) gains.

One kernel, three kinds of config:
- `gemv` (one row, M = 1): each program streams BLOCK_N full rows of W; products are summed on the
  CUDA cores into a [BLOCK_N, BLOCK_K] fp32 accumulator reduced once at the end (no shared-memory
  round trip for a tensor-core operand: a decode GEMV is bound by the weight stream alone);
- `dot`, skinny (M <= 16): the same stream against the rows padded into one 16-row tensor-core dot;
- `dot`, tiled (prefill, large batches): BLOCK_M x BLOCK_N output tiles in a grouped order (a weight
  tile is reused by GROUP_M row tiles while it is in L2).
4-bit tiles are unpacked in registers (`tl.interleave` of the low and high nibbles: K order). In
the dot configs the codes meet x as they are (integers and e4m3 values are exact in bf16), and a
per-channel scale (G = 1) or a group holding whole K tiles is applied to the fp32 sums: once at
the end, or to each tile's dot (its zero point as zero * sum(x) of the tile). Other group sizes (a
K tile spanning two groups) dequantize each element before the dot, rounded to the activation
dtype; the gemv dequantizes each element and sums in fp32.

A fourth kind, `words` (1 to 4 rows: decode), is the separate kernel of quant_gemv.py (the weight
read as 32-bit words, codes unpacked by mask-and-or into 2^23's mantissa, one layout for every load
of its loop); `quant_gemm` dispatches a words config to it and the tuner times it beside the others.

Which config is fastest depends on the shape, the row count and the GPU, so `tune_quant_linear`
times the candidates for each weight shape of the model and each row bucket (ROW_BUCKETS) and
`quant_linear` then uses the choice; untuned shapes (the CPU interpreter, a shape not in the model)
take `default_config`. The report lines say what was measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.ops import QuantFusion
from kernels.triton import pdl, quant_gemv
from kernels.triton.rms_norm import rms_norm
from kernels.triton.silu_and_mul import silu_and_mul, silu_and_mul_rms
from kernels.triton.skinny_gemm import _graph_seconds, _time_calls, l2_flush
from services.common import switches

SKINNY_MAX_ROWS = 16
# Row counts timed per weight shape; a call with M rows takes the choice of the smallest bucket >= M
# (the largest bucket beyond it).
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
# Row counts timed for a fused variant: the folded-norm path runs decode steps of <= 8 tokens
# (models/llama.py FOLDED_MAX_TOKENS), i.e. the buckets 1, 4 and 16.
FUSED_ROWS = (1, 4, 16)
# A tuning candidate's output must be within this relative (Frobenius) error of the fp32 twin.
TOLERANCE = 1e-2
C = TypeVar("C", covariant=True)  # a tuner's config type (Timed)


@dataclass(frozen=True)
class QuantConfig:
    block_m: int  # 1 for gemv
    block_n: int
    block_k: int  # in unpacked K columns
    num_warps: int
    num_stages: int
    dot: bool  # tensor-core dots (else the CUDA-core gemv: block_m must be 1)
    group_m: int = 8  # row tiles that share each weight column tile in the launch order
    # 4-bit codes: the low and high nibbles meet x's even and odd columns as they are (no interleave
    # back to K order), the offset / zero point and a group's scale applied to the sums (ignored
    # for 8-bit codes and for groups that need per-element scales)
    split4: bool = False
    # the few-row GEMV over 32-bit words of quant_gemv.py (dot False; block_m: the rows it takes)
    words: bool = False

    def __str__(self) -> str:
        kind = "words" if self.words else "dot" if self.dot else "gemv"
        split = ",split" if self.split4 else ""
        return f"{kind}(m{self.block_m},n{self.block_n},k{self.block_k},w{self.num_warps},s{self.num_stages}{split})"

    def takes(self, rows: int) -> bool:
        """Whether this config runs a call of `rows` rows (a gemv one row, a words config a few)."""
        if self.words:
            return rows <= self.block_m
        return self.dot or rows == 1


GEMV_CANDIDATES = (
    QuantConfig(1, 16, 512, 4, 3, dot=False),
    QuantConfig(1, 32, 256, 4, 3, dot=False),
    QuantConfig(1, 8, 1024, 4, 3, dot=False),
    QuantConfig(1, 16, 1024, 8, 2, dot=False),
)
SKINNY_CANDIDATES = (
    QuantConfig(16, 32, 256, 4, 4, dot=True),
    QuantConfig(16, 32, 512, 4, 3, dot=True),
    QuantConfig(16, 64, 128, 4, 4, dot=True),
    QuantConfig(16, 32, 128, 4, 4, dot=True),
    QuantConfig(16, 16, 128, 4, 4, dot=True),
)
# 4-bit only (`candidates(rows, bits=4)`): the nibble-split variants of the decode configs
SPLIT4_GEMV_CANDIDATES = (
    QuantConfig(1, 16, 512, 4, 3, dot=False, split4=True),
    QuantConfig(1, 32, 256, 4, 3, dot=False, split4=True),
)
SPLIT4_SKINNY_CANDIDATES = (
    QuantConfig(16, 32, 256, 4, 4, dot=True, split4=True),
    QuantConfig(16, 64, 128, 4, 4, dot=True, split4=True),
)
# The word GEMV (quant_gemv.py), one row. block_k in K columns (a 4-bit tile of the same bytes spans
# twice the columns of an 8-bit one), at least a word a thread and row (32 * num_warps words);
# num_stages: tiles in flight a warp (2: the next tile's words loaded before this one is summed).
# Each thread holds block_n rows of block_k / (codes a word * 32 * num_warps) words a tile.
WORDS_ROWS = quant_gemv.MAX_ROWS


def _words(block_n: int, block_k: int, num_warps: int, tiles: int) -> QuantConfig:
    return QuantConfig(WORDS_ROWS, block_n, block_k, num_warps, tiles, dot=False, words=True)


WORDS_CANDIDATES = {
    8: (
        _words(16, 512, 4, 1),
        _words(16, 1024, 4, 1),
        _words(8, 1024, 4, 2),
        _words(4, 1024, 4, 1),
        _words(32, 1024, 8, 1),
    ),
    4: (
        _words(16, 1024, 4, 1),
        _words(16, 2048, 4, 1),
        _words(8, 2048, 4, 2),
        _words(4, 2048, 4, 1),
        _words(8, 2048, 4, 1),
        _words(32, 2048, 8, 1),
    ),
}
# The word GEMV for 2..4 rows: fewer W rows a program (each x row has its own accumulators)
WORDS_FEW_CANDIDATES = {
    8: (_words(8, 512, 4, 1), _words(4, 1024, 4, 1), _words(8, 512, 4, 2)),
    4: (_words(8, 1024, 4, 1), _words(4, 2048, 4, 1), _words(8, 1024, 4, 2)),
}
TILED_CANDIDATES = (
    QuantConfig(64, 128, 64, 4, 4, dot=True),
    QuantConfig(128, 128, 64, 8, 3, dot=True),
    QuantConfig(128, 128, 128, 8, 3, dot=True),
    QuantConfig(128, 256, 64, 8, 3, dot=True),
)


def _doubles(config: QuantConfig) -> bool:
    """Whether the gated candidates take `config` at twice its BLOCK_N: not a words config of more
    than 16K codes a tile (doubled, a thread's accumulators spill registers: ptxas for sm_90)."""
    return not config.words or config.block_n * config.block_k <= 16384


def candidates(rows: int, bits: int = 8, gated: bool = False) -> tuple[QuantConfig, ...]:
    """The configs the tuner times for `rows` rows of `bits`-bit codes (e4m3: 8). A gated config's
    BLOCK_N weight rows are BLOCK_N / 2 gate rows and their BLOCK_N / 2 up rows, so `gated` adds
    each decode config at twice its BLOCK_N (BLOCK_N gate rows and the matching BLOCK_N up rows:
    the plain config's outputs per program), where not already a candidate."""
    split = bits == 4
    if rows == 1:
        plain = (
            GEMV_CANDIDATES
            + SKINNY_CANDIDATES
            + (SPLIT4_GEMV_CANDIDATES + SPLIT4_SKINNY_CANDIDATES) * split
            + WORDS_CANDIDATES[bits]
        )
    elif rows <= WORDS_ROWS:
        plain = SKINNY_CANDIDATES + SPLIT4_SKINNY_CANDIDATES * split + WORDS_FEW_CANDIDATES[bits]
    elif rows <= SKINNY_MAX_ROWS:
        plain = SKINNY_CANDIDATES + SPLIT4_SKINNY_CANDIDATES * split
    else:
        return TILED_CANDIDATES
    if not gated:
        return plain
    doubled = (dataclasses.replace(c, block_n=2 * c.block_n) for c in plain if _doubles(c))
    return plain + tuple(dict.fromkeys(c for c in doubled if c not in plain))


def default_config(rows: int) -> QuantConfig:
    """The config of an untuned shape."""
    if rows <= SKINNY_MAX_ROWS:
        return QuantConfig(16, 32, 256, 4, 4, dot=True)
    return QuantConfig(64, 64, 64, 4, 3, dot=True)


@triton.jit
def _quant_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] int8 / e4m3 (as uint8), or [N, K // 2] uint8 (BITS = 4)
    s_ptr,  # [N, G] fp32
    z_ptr,  # [N, G] fp32 (unused without HAS_ZEROS)
    b_ptr,  # [N] (unused without HAS_BIAS)
    y_ptr,  # [M, N], or [M, N // 2] (GATED)
    g_ptr,  # [K] the folded norm's weight (unused without NORM)
    r_ptr,  # [M, N] residual (unused without HAS_RESIDUAL)
    M,
    N,
    K,
    group_size,
    num_groups,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_rm,
    BITS: tl.constexpr,
    FP8: tl.constexpr,  # the 8-bit codes are e4m3 bit patterns
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_AT_END: tl.constexpr,  # G = 1: the scale multiplies the fp32 sums once
    GROUP_PER_TILE: tl.constexpr,  # each K tile lies in one group: one scale (and zero) per row
    SPLIT4: tl.constexpr,  # (4-bit, SCALE_AT_END or GROUP_PER_TILE) nibbles against even / odd x columns
    DOT: tl.constexpr,
    NORM: tl.constexpr,  # x * norm weight (per column) before the product: the folded norm's weight
    RMS_EPS: tl.constexpr,  # None: off; else the sums times rsqrt(mean(x^2) + eps) of each x row
    RMS_PRELOAD: tl.constexpr,  # (RMS, DOT, one row) x's whole row loaded before the loop, reduced after it
    K_PAD: tl.constexpr,  # next_power_of_2(K) (RMS_PRELOAD only)
    GATED: tl.constexpr,  # W is [gate; up] (N = 2 I rows): out[m, i] = silu(gate[m, i]) * up[m, i]
    HAS_RESIDUAL: tl.constexpr,  # add residual[m] to the result
    EARLY_SIGNAL: tl.constexpr,  # let the next kernel launch right after the wait (pdl.py)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    HALF: tl.constexpr = BLOCK_N // 2  # (GATED) outputs a program computes
    num_n = tl.cdiv(N // 2, HALF) if GATED else tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if GATED:
        # The tile's W rows: its HALF outputs' gate rows, then their up rows (I = N // 2 further
        # down), as the bf16 skinny GEMM reads them: the checkpoint's layout, nothing re-laid out.
        j = tl.arange(0, BLOCK_N)
        out_j = pid_n * HALF + j % HALF
        mask_n = out_j < N // 2
        offs_n = out_j + (j // HALF) * (N // 2)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    # Where the scales (and zeros) meet the sums: after each tile's dot (one per row and tile, or
    # once at the end), so the weight tile is only converted; else per element, before it.
    POST_DOT: tl.constexpr = DOT and (SCALE_AT_END or GROUP_PER_TILE)
    PACKED_K: tl.constexpr = BLOCK_K // 2 if BITS == 4 else BLOCK_K  # bytes of a tile row
    kb = tl.arange(0, PACKED_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = offs_n * num_groups
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif SPLIT4:
        acc2 = tl.zeros((BLOCK_N, PACKED_K), dtype=tl.float32)
        if not SCALE_AT_END:
            acc_zero = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum over groups of zero * scale * sum(x)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if (POST_DOT and HAS_ZEROS and SCALE_AT_END) or (SPLIT4 and SCALE_AT_END):
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of x over K: the zero's share
    pdl.enter(PDL)  # see pdl.py: nothing above reads an activation
    if EARLY_SIGNAL:
        pdl.leave(PDL)
    if RMS_EPS is not None:
        if RMS_PRELOAD:
            # The one row, loaded before the loop and reduced after it (its latency overlaps the
            # weight stream: the bf16 skinny GEMM's scheme, skinny_gemm.py)
            kr = tl.arange(0, K_PAD)
            x_row = tl.load(x_ptr + kr, mask=kr < K, other=0.0)
        elif not DOT:
            # (the gemv) x^2 of each tile summed elementwise into a tile-shaped accumulator, reduced
            # once after the loop: a few registers (BLOCK_K / threads) where the preloaded row would
            # hold K / threads, and x read once instead of twice
            if SPLIT4:
                x_sq_t = tl.zeros((BLOCK_M, PACKED_K), dtype=tl.float32)
            else:
                x_sq_t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        else:
            # sum of x^2 over K, from the tiles read anyway, as a tensor-core dot of x^2 against ones
            # (every column of x_sq2 holds the row's sum): a tl.sum per tile would be a cross-thread
            # reduction (shuffles, a shared-memory round trip and barriers) inside the K loop, which
            # stalls the weight stream; the dot accumulates in registers and is reduced once after
            # the loop. x^2 meets the dot in bf16 for bf16 activations, else in fp32 (fp16's range
            # would overflow for |x| > 256).
            SQ_DTYPE: tl.constexpr = tl.bfloat16 if x_ptr.dtype.element_ty == tl.bfloat16 else tl.float32
            x_sq2 = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
            if SPLIT4:
                sq_ones = tl.full((PACKED_K, 16), 1.0, SQ_DTYPE)
            else:
                sq_ones = tl.full((BLOCK_K, 16), 1.0, SQ_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        if SPLIT4:
            # codes q in [0, 15] (the offset 8 or the zero point z subtracted as z * sum(x) of the
            # tile); the low nibbles meet x's even columns, the high ones its odd columns
            kw = k0 // 2 + kb
            packed = tl.load(w_rows + kw[None, :], mask=mask_n[:, None] & (kw < K // 2)[None, :], other=0)
            packed = packed.to(tl.int32)
            ke = k0 + 2 * kb
            xe = tl.load(x_rows + ke[None, :], mask=mask_m[:, None] & (ke < K)[None, :], other=0.0)
            xo = tl.load(x_rows + ke[None, :] + 1, mask=mask_m[:, None] & (ke + 1 < K)[None, :], other=0.0)
            if RMS_EPS is not None and not RMS_PRELOAD:
                sq = xe.to(tl.float32) * xe.to(tl.float32) + xo.to(tl.float32) * xo.to(tl.float32)
                if DOT:
                    x_sq2 = tl.dot(sq.to(SQ_DTYPE), sq_ones, x_sq2)
                else:
                    x_sq_t += sq
            if NORM:
                ge = tl.load(g_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
                go = tl.load(g_ptr + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
                xe = (xe.to(tl.float32) * ge[None, :]).to(x_ptr.dtype.element_ty)
                xo = (xo.to(tl.float32) * go[None, :]).to(x_ptr.dtype.element_ty)
            xs = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)  # [BLOCK_M]
            if DOT:
                part = tl.dot(xe, tl.trans((packed & 0xF).to(xe.dtype)), out_dtype=tl.float32)
                part = tl.dot(xo, tl.trans((packed >> 4).to(xe.dtype)), part)
            else:
                # q as fp32 without a conversion instruction (quarter rate on the CUDA cores): the
                # bits of 2^23 + q, minus 2^23 (both exact)
                lo = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                hi = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                part2 = lo * xe.to(tl.float32) + hi * xo.to(tl.float32)
            if SCALE_AT_END:
                if DOT:
                    acc += part
                else:
                    acc2 += part2
                x_sum += xs
            else:
                sg = s_rows + k0 // group_size
                scale = tl.load(s_ptr + sg, mask=mask_n, other=0.0)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + sg, mask=mask_n, other=0.0)
                else:
                    zero = tl.full((BLOCK_N,), 8.0, tl.float32)
                if DOT:
                    acc += (part - xs[:, None] * zero[None, :]) * scale[None, :]
                else:
                    acc2 += part2 * scale[:, None]
                    acc_zero += zero * scale * xs
        else:
            k_col = k0 + tl.arange(0, BLOCK_K)
            k_mask = k_col < K
            if BITS == 4:
                kw = k0 // 2 + kb
                packed = tl.load(w_rows + kw[None, :], mask=mask_n[:, None] & (kw < K // 2)[None, :], other=0)
                packed = packed.to(tl.int32)
                q = tl.interleave(packed & 0xF, packed >> 4)  # [BLOCK_N, BLOCK_K]: even k low nibble
                if not HAS_ZEROS:
                    q = q - 8
            else:
                q = tl.load(w_rows + k_col[None, :], mask=mask_n[:, None] & k_mask[None, :], other=0)
                if FP8:
                    q = q.to(tl.float8e4nv, bitcast=True)
            x = tl.load(x_rows + k_col[None, :], mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            if RMS_EPS is not None and not RMS_PRELOAD:
                if DOT:
                    x_sq2 = tl.dot((x.to(tl.float32) * x.to(tl.float32)).to(SQ_DTYPE), sq_ones, x_sq2)
                else:
                    x_sq_t += x.to(tl.float32) * x.to(tl.float32)
            if NORM:
                g = tl.load(g_ptr + k_col, mask=k_mask, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) * g[None, :]).to(x_ptr.dtype.element_ty)
            if POST_DOT:
                part = tl.dot(x, tl.trans(q.to(x.dtype)), out_dtype=tl.float32)
                if SCALE_AT_END:
                    acc += part
                    if HAS_ZEROS:
                        x_sum += tl.sum(x.to(tl.float32), axis=1)
                else:
                    sg = s_rows + k0 // group_size
                    if HAS_ZEROS:
                        zero = tl.load(z_ptr + sg, mask=mask_n, other=0.0)
                        part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * zero[None, :]
                    acc += part * tl.load(s_ptr + sg, mask=mask_n, other=0.0)[None, :]
            else:
                w = q.to(tl.float32)
                if not SCALE_AT_END:
                    if GROUP_PER_TILE:
                        sg = s_rows + k0 // group_size
                        scale = tl.load(s_ptr + sg, mask=mask_n, other=0.0)[:, None]
                        if HAS_ZEROS:
                            w = w - tl.load(z_ptr + sg, mask=mask_n, other=0.0)[:, None]
                    else:
                        sg2 = s_rows[:, None] + (k_col // group_size)[None, :]
                        smask = mask_n[:, None] & k_mask[None, :]
                        scale = tl.load(s_ptr + sg2, mask=smask, other=0.0)
                        if HAS_ZEROS:
                            w = w - tl.load(z_ptr + sg2, mask=smask, other=0.0)
                    w = w * scale
                elif HAS_ZEROS:
                    w = w - tl.load(z_ptr + s_rows, mask=mask_n, other=0.0)[:, None]
                if DOT:
                    acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
                else:
                    acc2 += w * x.to(tl.float32)
    if not EARLY_SIGNAL:
        pdl.leave(PDL)  # the weights are read: the next kernel may launch and wait on this one
    if not DOT:
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
        if SPLIT4 and not SCALE_AT_END:
            acc -= acc_zero[None, :]
    if SCALE_AT_END:
        if SPLIT4:
            if HAS_ZEROS:
                acc -= x_sum[:, None] * tl.load(z_ptr + s_rows, mask=mask_n, other=0.0)[None, :]
            else:
                acc -= x_sum[:, None] * 8.0
        elif POST_DOT and HAS_ZEROS:
            acc -= x_sum[:, None] * tl.load(z_ptr + s_rows, mask=mask_n, other=0.0)[None, :]
        acc = acc * tl.load(s_ptr + s_rows, mask=mask_n, other=0.0)[None, :]
    if RMS_EPS is not None:
        if RMS_PRELOAD:
            xf = x_row.to(tl.float32)
            acc = acc * tl.rsqrt(tl.sum(xf * xf, axis=0) / K + RMS_EPS)
        else:
            # (a dot's 16 columns are equal)
            x_sq = tl.max(x_sq2, axis=1) if DOT else tl.sum(x_sq_t, axis=1)
            acc = acc * tl.rsqrt(x_sq / K + RMS_EPS)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), (0, 2, 1)))  # [BLOCK_M, HALF]
        out_cols = pid_n * HALF + tl.arange(0, HALF)
        tl.store(
            y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + out_cols[None, :],
            (gate / (1.0 + tl.exp(-gate)) * up).to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & (out_cols < N // 2)[None, :],
        )
        return
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(
            r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=out_mask, other=0.0
        )
        acc += residual.to(tl.float32)
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=out_mask,
    )


def quant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: QuantConfig,
    norm_weight: torch.Tensor | None = None,
    rms_eps: float | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    early_signal: bool = False,
) -> torch.Tensor:
    """`quant_linear` with a given config (a gemv config needs M = 1). e4m3 weights: bits=8.

    The folded-norm decode path's fusions (twin: `reference.quant_linear_fused`): norm_weight [K]
    multiplies x's columns before the product (rounded to x's dtype, as a norm's output is),
    rms_eps scales each row's fp32 sums by rsqrt(mean(x^2) + rms_eps) of the raw row (before the
    bias), gated takes silu(gate) * up of a fused [gate; up] weight (N / 2 columns out), residual
    [M, N] is added before the one rounding. early_signal: let the next PDL kernel launch as soon
    as this one passed its wait (pdl.py)."""
    if bits not in (4, 8):
        raise ValueError(f"quant_linear: unsupported bits={bits} (8 or 4)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    num_groups = scales.shape[1]
    group_size = k // num_groups
    if bits == 4 and group_size % 2:
        raise ValueError(f"quant_linear: 4-bit groups must be of an even size, got {group_size}")
    if gated and (n % 2 or residual is not None):
        raise ValueError(f"quant_linear: a gated weight has an even row count and no residual, got {n} rows")
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1, (residual.shape, m, n)
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.is_contiguous(), (norm_weight.shape, k)
    y = torch.empty(m, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if not config.takes(m):
        most = f"at most {config.block_m} rows" if config.words else "one row"
        raise ValueError(f"{config} takes {most}, got {m}")
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        scales = scales.float().contiguous()
    if zeros is not None and (zeros.dtype != torch.float32 or not zeros.is_contiguous()):
        zeros = zeros.float().contiguous()
    if config.words:
        return quant_gemv.quant_gemv(
            x,
            qweight,
            scales,
            bits,
            zeros,
            bias,
            y,
            config.block_n,
            config.block_k,
            config.num_warps,
            config.num_stages,
            norm_weight,
            rms_eps,
            gated,
            residual,
            early_signal,
        )
    fp8 = qweight.dtype == torch.float8_e4m3fn
    block_k, num_stages = config.block_k, config.num_stages
    if num_groups > 1 and group_size % block_k:
        # K tiles inside one group each (the largest power of two dividing the group size, >= 32): its
        # scale meets the tile's sums. A tile spanning groups would dequantize every element first
        # (a scale and zero per element: far slower, and its loads fill shared memory).
        fit = block_k
        while group_size % fit:
            fit //= 2
        if fit >= 32:  # (16-column tiles of 4-bit codes computed wrong sums on the GPU: docs/quantization.md)
            block_k = fit
        else:
            num_stages = min(num_stages, 2)
    # A gated program computes block_n / 2 outputs from block_n weight rows (its gate and up rows).
    columns = triton.cdiv(n // 2, config.block_n // 2) if gated else triton.cdiv(n, config.block_n)
    grid = (triton.cdiv(m, config.block_m) * columns,)
    rms_preload = rms_eps is not None and m == 1 and config.dot
    _quant_gemm_kernel[grid](
        x,
        qweight.view(torch.uint8) if fp8 else qweight,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        y,
        norm_weight if norm_weight is not None else scales,
        residual if residual is not None else y,
        m,
        n,
        k,
        group_size,
        num_groups,
        x.stride(0),
        qweight.stride(0),
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        BITS=bits,
        FP8=fp8,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        SCALE_AT_END=num_groups == 1,
        GROUP_PER_TILE=group_size % block_k == 0,
        SPLIT4=config.split4 and bits == 4 and (num_groups == 1 or group_size % block_k == 0),
        DOT=config.dot,
        NORM=norm_weight is not None,
        RMS_EPS=rms_eps,
        RMS_PRELOAD=rms_preload,
        K_PAD=triton.next_power_of_2(k) if rms_preload else 1,
        GATED=gated,
        HAS_RESIDUAL=residual is not None,
        EARLY_SIGNAL=early_signal,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=num_stages,
        # PDL for the decode-sized configs, as the bf16 skinny GEMM (larger calls stay as they were)
        **(pdl.launch_options(x.device) if m <= SKINNY_MAX_ROWS else {"PDL": False}),
    )
    return y


def _bucket(rows: int) -> int:
    """The tuned row count whose choice a call with `rows` rows takes."""
    return next((b for b in ROW_BUCKETS if b >= rows), ROW_BUCKETS[-1])


# (N, K, bits, groups, has_zeros, has_bias, row bucket, e4m3 codes) -> the config `quant_linear` uses
_CHOICE: dict[tuple[int, int, int, int, bool, bool, int, bool], QuantConfig] = {}


def _key(
    n: int, k: int, bits: int, groups: int, zeros: bool, bias: bool, rows: int, fp8: bool = False
) -> tuple:  # type: ignore[type-arg]
    # fp8 apart from int8 (both 8-bit codes of one shape): their kernels differ (the e4m3 decode),
    # so does their timing, and one process may tune both (quant_bench runs int8 then fp8)
    return (n, k, bits, groups, zeros, bias, _bucket(rows), fp8)


def _is_fp8(qweight: torch.Tensor) -> bool:
    return qweight.dtype == torch.float8_e4m3fn


def chosen(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, zeros: bool, bias: bool
) -> QuantConfig:
    """The config `quant_linear` runs for this call: the tuned choice of its shape and row bucket
    (a gemv choice only for one row), else `default_config`."""
    return _usable(_CHOICE.get(_call_key(x, qweight, scales, bits, zeros, bias)), x.shape[0])


def _call_key(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, zeros: bool, bias: bool
) -> tuple:  # type: ignore[type-arg]
    """The tuner's key of a call (its shape, format and row bucket)."""
    return _key(
        qweight.shape[0], x.shape[1], bits, scales.shape[1], zeros, bias, x.shape[0], _is_fp8(qweight)
    )


def _usable(config: QuantConfig | None, m: int) -> QuantConfig:
    """A tuned choice for `m` rows (a gemv choice only for one row, a words choice for a few),
    else `default_config`."""
    if config is None or not config.takes(m):
        return default_config(m)
    return config


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.reference.quant_linear`."""
    config = chosen(x, qweight, scales, bits, zeros is not None, bias is not None)
    return quant_gemm(x, qweight, scales, bits, zeros, bias, config)


# (N, K, bits, groups, has_zeros, has_bias, row bucket, fusion) -> the config `quant_linear_fused` uses
_FUSED_CHOICE: dict[tuple, QuantConfig] = {}  # type: ignore[type-arg]
# The gated keys of _FUSED_CHOICE where the tuner measured the GEMM (its config, without the SiLU)
# then the SiLU kernel faster than the one fused launch: `quant_linear_fused` runs those two.
_GATED_SPLIT: set[tuple] = set()  # type: ignore[type-arg]
# The keys of _FUSED_CHOICE where the tuner measured the unfused sequence (the norm kernel, the
# unfused GEMM in the config kept here, then the SiLU kernel or the residual add) faster than the
# fused launch (and than the gated pair): `quant_linear_fused` runs that sequence.
_UNFUSED: dict[tuple, QuantConfig] = {}  # type: ignore[type-arg]
# A sequence of more launches (the gated pair, the unfused sequence) replaces the choice with fewer
# only where it measured more than this factor faster (`keep_fused`).
FUSE_MIN_GAIN = 1.03
Kept = Literal["fused", "pair", "unfused"]


@dataclass(frozen=True)
class FusedDecision:
    """What `tune_quant_linear(fusion=...)` measured for one key of _FUSED_CHOICE (device seconds a
    call on a cold L2, as `time_candidates`; None: not timed, rejected or failed) and what
    `quant_linear_fused` runs for it: `kept`, decided by `keep_fused` under `mode` (the
    TANDEM_QUANT_FUSE value)."""

    label: str  # the report line's head: "quant gate_up_proj 8-bit 28672x4096 norm+rms+silu"
    rows: int  # the row bucket
    config: QuantConfig  # the fastest fused candidate (the gated pair's GEMM runs it too)
    fused_s: float
    pair_s: float | None  # the GEMM then the SiLU kernel (gated variants only)
    unfused: QuantConfig  # the plain GEMM's config in the unfused sequence
    unfused_s: float | None
    kept: Kept
    mode: str

    def verdict(self) -> str:
        """What runs, as the report line names it."""
        if self.kept == "unfused":
            return f"unfused {self.unfused}"
        return f"{self.config} + SiLU" if self.kept == "pair" else str(self.config)

    def summary(self) -> dict[str, object]:
        """The decision as JSON values: configs by name, times in microseconds."""

        def micro(seconds: float | None) -> float | None:
            return None if seconds is None else seconds * 1e6

        return {
            "label": self.label,
            "rows": self.rows,
            "config": str(self.config),
            "fused_us": micro(self.fused_s),
            "pair_us": micro(self.pair_s),
            "unfused_config": str(self.unfused),
            "unfused_us": micro(self.unfused_s),
            "kept": self.kept,
            "verdict": self.verdict(),
            "mode": self.mode,
        }


# The decision behind each key of _FUSED_CHOICE that the tuner measured, in tuning order
_FUSED_DECISIONS: dict[tuple, FusedDecision] = {}  # type: ignore[type-arg]


def fused_decisions() -> list[FusedDecision]:
    """Every fused variant's decision this process's tuner made (`FusedDecision`), in tuning order."""
    return list(_FUSED_DECISIONS.values())


def keep_fused(
    fused_s: float,
    pair_s: float | None,
    unfused_s: float | None,
    mode: str = "auto",
    min_gain: float = FUSE_MIN_GAIN,
) -> Kept:
    """Which of the one fused launch, the gated pair (two launches) and the unfused sequence (two
    or three) `quant_linear_fused` runs, from their measured seconds (None: not measured, or not
    within tolerance). `mode` (TANDEM_QUANT_FUSE): "always" the fused launch; "never" the unfused
    sequence where it was measured (else the fused launch); "auto" takes them in that order of
    launches, each replacing the choice so far only where it is more than `min_gain` times faster
    (a tie keeps the fewer launches).

    Why the margin leans towards fewer launches: the tuner times each in isolation, a CUDA graph of
    (L2 flush, call) pairs, where the norm and SiLU kernels of the sequence start after a flush and
    cost little more than their own runtime; in the decode graph each further launch also costs
    its gap and ramp-up between the step's other kernels, which the isolated timing charges only in
    part. And where the sequence and the fused launch differ by a few percent the difference is
    within the tuner's run-to-run noise (two rounds chose differently for the same shape on the
    same GPU kind: docs/quantization.md). So a gap under `min_gain` keeps the choice with fewer
    launches; a larger one is a measured loss of the fusion and the tuner takes the sequence."""
    if mode == "always":
        return "fused"
    if mode == "never":
        return "unfused" if unfused_s is not None else "fused"
    kept: Kept = "fused"
    best = fused_s
    more: tuple[tuple[Kept, float | None], ...] = (("pair", pair_s), ("unfused", unfused_s))
    for name, seconds in more:
        if seconds is not None and seconds * min_gain < best:
            kept, best = name, seconds
    return kept


def _record_fused(
    key: tuple,  # type: ignore[type-arg]
    label: str,
    rows: int,
    config: QuantConfig,
    fused_s: float,
    pair_s: float | None,
    unfused: QuantConfig,
    unfused_s: float | None,
    mode: str,
) -> FusedDecision:
    """Keep `keep_fused`'s decision for `key`: the fused config in _FUSED_CHOICE, the key in
    _GATED_SPLIT or _UNFUSED where the gated pair or the unfused sequence runs, and the record."""
    kept = keep_fused(fused_s, pair_s, unfused_s, mode)
    _FUSED_CHOICE[key] = config
    _GATED_SPLIT.discard(key)
    _UNFUSED.pop(key, None)
    if kept == "pair":
        _GATED_SPLIT.add(key)
    elif kept == "unfused":
        _UNFUSED[key] = unfused
    decision = FusedDecision(label, rows, config, fused_s, pair_s, unfused, unfused_s, kept, mode)
    _FUSED_DECISIONS[key] = decision
    return decision


def chosen_fused(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: bool,
    bias: bool,
    fusion: QuantFusion,
) -> QuantConfig:
    """The config `quant_linear_fused` runs for this call: the tuned choice of the fused variant,
    else `default_config`."""
    key = (*_call_key(x, qweight, scales, bits, zeros, bias), fusion)
    return _usable(_FUSED_CHOICE.get(key), x.shape[0])


def quant_linear_fused(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    rms_eps: float | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    early_signal: bool = False,
) -> torch.Tensor:
    """Same contract as `kernels.reference.quant_linear_fused`: one launch, in the config that
    `tune_quant_linear(fusion=...)` measured fastest for the variant, or the gated pair or the
    unfused sequence where the tuner kept those (`keep_fused`)."""
    fusion = QuantFusion(norm_weight is not None, rms_eps is not None, gated, residual is not None)
    key = (*_call_key(x, qweight, scales, bits, zeros is not None, bias is not None), fusion)
    config = _usable(_FUSED_CHOICE.get(key), x.shape[0])
    unfused = _UNFUSED.get(key)
    if unfused is not None and unfused.takes(x.shape[0]):
        return _unfused_sequence(
            x, qweight, scales, bits, zeros, bias, unfused, norm_weight, rms_eps, gated, residual
        )
    if gated and key in _GATED_SPLIT:
        return _gated_pair(x, qweight, scales, bits, zeros, bias, config, norm_weight, rms_eps)
    return quant_gemm(
        x, qweight, scales, bits, zeros, bias, config, norm_weight, rms_eps, gated, residual, early_signal
    )


def _gated_pair(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: QuantConfig,
    norm_weight: torch.Tensor | None,
    rms_eps: float | None,
) -> torch.Tensor:
    """The gated variant as two launches: the GEMM (norm weight, bias) letting the SiLU kernel launch
    early, then SiLU-and-mul with the row's 1/rms (`silu_and_mul_rms`: the same function, the
    gate/up sums rounded once in between). Not with both a bias and rms_eps (silu_and_mul_rms
    would scale the bias too)."""
    assert bias is None or rms_eps is None, "the two-launch gated variant has no bias after the 1/rms"
    gate_up = quant_gemm(x, qweight, scales, bits, zeros, bias, config, norm_weight, early_signal=True)
    return silu_and_mul(gate_up) if rms_eps is None else silu_and_mul_rms(gate_up, x, rms_eps)


def _unfused_sequence(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: QuantConfig,
    norm_weight: torch.Tensor | None,
    rms_eps: float | None,
    gated: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """What a fused variant replaces, as separate launches: the norm (RMSNorm with its weight, or
    x * g alone where the 1/rms is elsewhere), the plain GEMM in `config`, then SiLU-and-mul or the
    residual add (each rounded to the activation dtype in between, as the unfolded model does)."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, rms_eps) if rms_eps is not None else x * norm_weight
    elif rms_eps is not None:
        x = rms_norm(x, torch.ones(x.shape[1], dtype=x.dtype, device=x.device), rms_eps)
    y = quant_gemm(x, qweight, scales, bits, zeros, bias, config)
    if gated:
        y = silu_and_mul(y)
    if residual is not None:
        y = y + residual
    return y


# (N, K, has_bias, row bucket) -> the FP8 tuner's weight-only choice (fp8_gemm.py records it here:
# this module is below fp8_gemm in the import graph)
FP8_WEIGHT_ONLY_CHOICE: dict[tuple[int, int, bool, int], QuantConfig] = {}


def _unfused_config(key: tuple, fp8: bool, fallback: QuantConfig) -> QuantConfig:  # type: ignore[type-arg]
    """The plain GEMM's tuned config for the unfused key (quant_linear's choice; FP8: the FP8
    tuner's weight-only choice), else `fallback`."""
    config: object = _CHOICE.get(key)
    if config is None and fp8:
        n, k, _, _, _, bias, bucket, _ = key
        config = FP8_WEIGHT_ONLY_CHOICE.get((n, k, bias, bucket))
    return config if isinstance(config, QuantConfig) else fallback


def fp8_weight_only(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: QuantConfig,
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] e4m3 * weight_scale [N, 1]).T (+ bias): FP8 weights against
    activations in their own dtype (twin: `reference.fp8_linear`)."""
    return quant_gemm(x, weight, weight_scale.reshape(-1, 1), 8, None, bias, config)


@dataclass(frozen=True)
class Timed(Generic[C]):
    """One candidate's measurement (this file's tuner and fp8_gemm's): device seconds per call
    (None: rejected or failed) and its output's relative error against the twin of what it
    computes."""

    config: C
    seconds: float | None
    rel_err: float


def choose(timed: Sequence[Timed[QuantConfig]]) -> QuantConfig | None:
    """The fastest candidate within TOLERANCE of the twin (None when there is none)."""
    ok = [t for t in timed if t.seconds is not None and t.rel_err < TOLERANCE]
    return min(ok, key=lambda t: t.seconds or 0.0).config if ok else None


def time_candidates(
    run,  # type: ignore[no-untyped-def]  # (x, weight, config) -> y
    ref: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    configs: Sequence[QuantConfig],
    flush,  # type: ignore[no-untyped-def]
    flush_s: float,
    iters: int,
) -> tuple[list[Timed[QuantConfig]], list[str]]:
    """Each config's error on weights[0] against `ref` and, within TOLERANCE, its device seconds
    per call on a cold L2 (skinny_gemm._time_calls); one report entry a config."""
    timed: list[Timed[QuantConfig]] = []
    results: list[str] = []
    for config in configs:
        try:
            out = run(x, weights[0], config).double()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            seconds: float | None = None
            if err < TOLERANCE:
                seconds = _time_calls(lambda w, c=config: run(x, w, c), weights, flush, flush_s, iters)
                results.append(f"{config} {seconds * 1e6:.1f} us")
            else:
                results.append(f"{config} rejected (rel err {err:.2g})")
        except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
            results.append(f"{config} failed ({type(exc).__name__})")
            seconds, err = None, float("inf")
        timed.append(Timed(config, seconds, err))
    return timed, results


def tune_quant_linear(
    weights: list[torch.Tensor],  # packed weights of one shape: the same projection of every layer
    scales: list[torch.Tensor],  # [N, G] fp32, one per weight
    zeros: list[torch.Tensor] | None,  # [N, G] fp32 per weight, or None
    bits: int,
    bias: torch.Tensor | None,  # [N] of the first layer (its presence selects the kernel variant)
    name: str = "",
    rows: Sequence[int] | None = None,
    reps: int = 20,
    fusion: QuantFusion | None = None,
) -> list[str]:
    """Time each candidate config for each row count of `rows` (buckets of ROW_BUCKETS; default
    all of them, FUSED_ROWS for a fusion) and keep the fastest within tolerance of the twin for
    `quant_linear`, or with `fusion` for `quant_linear_fused` calls of that variant (timed on a
    random norm weight and residual, the twin `reference.quant_linear_fused`); a fusion's fastest
    config is then timed as the gated pair (gate/up) and against the unfused sequence, and
    `keep_fused` decides which runs (`fused_decisions` keeps the times and the decision). One
    report line per row count. CUDA only (else [] and the defaults stay)."""
    w0 = weights[0]
    if not w0.is_cuda:
        return []
    if rows is None:
        rows = ROW_BUCKETS if fusion is None else FUSED_ROWS
    n = w0.shape[0]
    k = w0.shape[1] * (2 if bits == 4 else 1)
    groups = scales[0].shape[1]
    flush = l2_flush(w0.device)
    flush_s = _graph_seconds(lambda i: flush(), 10) / 10
    index = {w.data_ptr(): i for i, w in enumerate(weights)}
    gen = torch.Generator(device=w0.device).manual_seed(0)
    dense = reference.dequantize_weight(w0, scales[0], bits, zeros[0] if zeros else None)  # fp32 [N, K]
    lines = []
    choices: dict[tuple, QuantConfig] = _CHOICE if fusion is None else _FUSED_CHOICE  # type: ignore[type-arg]
    label = f"quant {name} {bits}-bit {n}x{k}" + ("" if fusion is None else f" {fusion}")
    # The fused variant's extra operands (a norm weight around 1, as real ones are)
    norm_weight = eps = None
    if fusion is not None and fusion.norm:
        norm_weight = (1.0 + 0.1 * torch.randn(k, device=w0.device, generator=gen)).to(torch.bfloat16)
    if fusion is not None and fusion.rms:
        eps = 1e-5
    gated = fusion is not None and fusion.gated
    for m in rows:
        key = _key(n, k, bits, groups, zeros is not None, bias is not None, m, _is_fp8(w0))
        if fusion is not None:
            key = (*key, fusion)
        if key in choices:
            # tuned once per process: a second engine keeps the choice (numerics do not change)
            split_note = " + SiLU" if key in _GATED_SPLIT else ""
            kept = f"unfused {_UNFUSED[key]}" if key in _UNFUSED else f"{choices[key]}{split_note}"
            lines.append(f"{label} rows={m}: tuned before -> {kept}")
            continue
        x = torch.randn(m, k, device=w0.device, generator=gen).to(torch.bfloat16)
        residual = None
        if fusion is not None and fusion.residual:
            residual = torch.randn(m, n, device=w0.device, generator=gen).to(torch.bfloat16)
        if fusion is None:
            ref = x.double() @ dense.double().t() + (bias.double() if bias is not None else 0.0)
        else:  # the twin on x in fp32 (so its output is not rounded to bf16)
            z0 = zeros[0] if zeros else None
            ref = reference.quant_linear_fused(
                x.float(), w0, scales[0], bits, z0, bias, norm_weight, eps, gated, residual
            ).double()

        def run(
            x: torch.Tensor, w: torch.Tensor, c: QuantConfig, r: torch.Tensor | None = residual
        ) -> torch.Tensor:
            i = index[w.data_ptr()]
            return quant_gemm(
                x, w, scales[i], bits, zeros[i] if zeros else None, bias, c, norm_weight, eps, gated, r
            )

        iters = reps if m <= SKINNY_MAX_ROWS else max(reps // 4, 3)
        timed, results = time_candidates(
            run, ref, x, weights, candidates(m, bits, gated), flush, flush_s, iters
        )
        best = choose(timed)
        verdict = str(best or default_config(m))
        if fusion is None or best is None:
            if best is not None:
                choices[key] = best
            lines.append(f"{label} rows={m}: " + ", ".join(results) + f" -> {verdict}")
            continue
        fused_s = next(t.seconds for t in timed if t.config == best)
        assert fused_s is not None
        pair_s = None
        if gated and (bias is None or eps is None):
            # The one launch against the two it replaces (that GEMM, then the SiLU kernel), as the
            # bf16 path measures its SiLU epilogue.
            def pair(x: torch.Tensor, w: torch.Tensor, c: QuantConfig) -> torch.Tensor:
                i = index[w.data_ptr()]
                z = zeros[i] if zeros else None
                return _gated_pair(x, w, scales[i], bits, z, bias, c, norm_weight, eps)

            split, split_results = time_candidates(pair, ref, x, weights, [best], flush, flush_s, iters)
            results.append("GEMM + SiLU " + split_results[0])
            pair_s = split[0].seconds
        # The safety net: the fused launch (and the gated pair) against what it replaces, the norm
        # kernel, the plain GEMM in its own tuned config and the SiLU kernel or the residual add;
        # checked against the same twin before it is timed (time_candidates). `keep_fused` keeps
        # the fusion unless a sequence of more launches measured faster by its margin.
        plain = _unfused_config(key[:-1], _is_fp8(w0), best)

        def sequence(
            x: torch.Tensor, w: torch.Tensor, c: QuantConfig, r: torch.Tensor | None = residual
        ) -> torch.Tensor:
            i = index[w.data_ptr()]
            z = zeros[i] if zeros else None
            return _unfused_sequence(x, w, scales[i], bits, z, bias, c, norm_weight, eps, gated, r)

        apart, apart_results = time_candidates(sequence, ref, x, weights, [plain], flush, flush_s, iters)
        results.append("unfused " + apart_results[0])
        decision = _record_fused(
            key, label, m, best, fused_s, pair_s, plain, apart[0].seconds, switches.QUANT_FUSE.value
        )
        verdict = decision.verdict()
        if decision.mode != "auto":
            verdict += f" (TANDEM_QUANT_FUSE={decision.mode})"
        lines.append(f"{label} rows={m}: " + ", ".join(results) + f" -> {verdict}")
    del dense
    return lines
