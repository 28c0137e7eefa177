"""FP8 W8A8 GEMM: y = (q(x) @ W.T) * x_scale * w_scale (+ b), and the per-shape choice between it
and `torch._scaled_mm`, made by timing both on this GPU.

W is float8 e4m3 [N, K] with one fp32 scale per output channel; x (bf16) is quantized per token
(dynamic: each row's scale is max |x| * (1/448), `reference.quantize_per_token_fp8`, the twin of all
of this file being `reference.fp8_w8a8_linear`). The two e4m3 operands meet in tensor-core dots
with fp32 accumulators (on Hopper's warp-group MMA each K tile's dot is added to the fp32 sum,
never carried across tiles in the FP8 tensor core's narrower adder: `max_num_imprecise_acc`); the scales,
then the bias, are applied to the fp32 sums in the epilogue; the output is rounded once.

Two kinds of config of the one kernel:
- decode-sized (M <= 16): one 16- or 64-row block, the activations quantized inside the GEMM (a first
  pass over K takes each row's max, the main loop rounds each x tile to e4m3 in registers): one
  launch per projection, and the weight is the only real traffic;
- prefill / large batches: 64- or 128-row tiles in a grouped order (a weight tile is reused by
  GROUP_M row tiles while it is in L2), the activations quantized first by `quantize_per_token`
  (one program a row) so that the GEMM reads e4m3 x once instead of re-reading bf16 x twice per
  column tile.

Which is faster than `torch._scaled_mm` (cuBLASLt, row-wise scales; its activations quantized by
the same `quantize_per_token` kernel) depends on the shape and the GPU, so nothing is assumed:
`tune_fp8_linear` times `_scaled_mm` and each candidate config for each W8A8 weight shape of the
model and each row bucket (ROW_BUCKETS), and `w8a8_linear` then uses the choice (`choose`: a
config only when it is within tolerance of the twin and at least MIN_GAIN faster). For
decode-sized buckets the candidates include the weight-only GEMM of quant_gemm.py (e4m3 weights
against the bf16 activations, unquantized: a decode step is bound by the weight stream, and
quantizing its activations buys nothing there; its twin is `reference.fp8_linear`, closer to the
bf16 model than W8A8's). The report lines say what was measured.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton import quant_gemm
from kernels.triton.quant_gemm import QuantConfig, Timed, fp8_weight_only
from kernels.triton.skinny_gemm import _graph_seconds, _time_calls, l2_flush

FP8 = torch.float8_e4m3fn
# A config must beat `_scaled_mm` by this factor to be chosen: smaller gaps are within timing noise.
MIN_GAIN = 1.03
# ... and its output on the tuning input must be within this relative (Frobenius) error of the twin.
TOLERANCE = 1e-2
# Row counts timed per weight shape; a call with M rows takes the choice of the smallest bucket >= M
# (the largest bucket beyond it).
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
DECODE_MAX_ROWS = 16  # buckets up to here try the decode configs, above it the prefill ones


@dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    prequant: bool  # activations quantized by `quantize_per_token` first (else inside the GEMM)
    group_m: int = 8  # row tiles that share each weight column tile in the launch order

    def __str__(self) -> str:
        pre = ",prequant" if self.prequant else ""
        return f"triton(m{self.block_m},n{self.block_n},k{self.block_k},w{self.num_warps},s{self.num_stages}{pre})"


DECODE_CANDIDATES = (
    Fp8Config(16, 64, 256, 4, 4, prequant=False),
    Fp8Config(16, 32, 512, 4, 3, prequant=False),
    Fp8Config(16, 128, 128, 4, 4, prequant=False),
    # a 64-row tile: Hopper's warp-group MMA needs 64 rows (16-row tiles take the older MMA)
    Fp8Config(64, 64, 256, 4, 3, prequant=False),
)
PREFILL_CANDIDATES = (
    Fp8Config(64, 128, 128, 4, 4, prequant=True),
    Fp8Config(128, 128, 128, 8, 3, prequant=True),
    Fp8Config(128, 256, 128, 8, 3, prequant=True),
)


def candidates(rows: int) -> tuple[Fp8Config, ...]:
    return DECODE_CANDIDATES if rows <= DECODE_MAX_ROWS else PREFILL_CANDIDATES


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] e4m3
    s_ptr,  # [M] fp32
    K,
    stride_xm,
    stride_qm,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # the scale: one fp32 multiply by fp32(1/448), as the twin defines it; the codes: div_rn,
    # IEEE division as torch's (Triton's default fp32 division is approximate)
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * (1.0 / 448.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        tl.store(q_ptr + row * stride_qm + k, q.to(tl.float8e4nv), mask=k < K)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.quantize_per_token_fp8` in one launch: (e4m3 [M, K], fp32 scales [M, 1])."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    m, k = x.shape
    codes = torch.empty(m, k, dtype=FP8, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(max(k, 16)), 2048)
        _quantize_rows_kernel[(m,)](
            x, codes, scales, k, x.stride(0), codes.stride(0), BLOCK=block, num_warps=4
        )
    return codes, scales


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,  # [M, K]: e4m3 codes (X_FP8) or the activations (bf16 / fp16 / fp32)
    xs_ptr,  # [M] fp32 per-token scales (X_FP8 only)
    w_ptr,  # [N, K] e4m3
    ws_ptr,  # [N] fp32 per-channel scales
    b_ptr,  # [N] (HAS_BIAS only)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    X_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROMOTE: tl.constexpr,  # add each K tile's dot to the fp32 sum (Hopper's imprecise fp8 adder)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_base = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if X_FP8:
        x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=1.0)
    else:
        # Each row's max |x| first (its scale must be known before any tile is rounded to e4m3)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            x = tl.load(x_base + k[None, :], mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        x_scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)  # (as the twin: see _quantize_rows_kernel)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        x = tl.load(x_base + k[None, :], mask=mask_m[:, None] & k_mask[None, :], other=0.0)
        if not X_FP8:
            xf = tl.math.div_rn(x.to(tl.float32), x_scale[:, None])
            x = tl.minimum(tl.maximum(xf, -448.0), 448.0).to(tl.float8e4nv)
        w = tl.load(w_base + k[None, :], mask=mask_n[:, None] & k_mask[None, :], other=0.0)
        if PROMOTE:
            acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def fp8_gemm(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N, 1] or [N] fp32
    bias: torch.Tensor | None,  # [N]
    config: Fp8Config,
) -> torch.Tensor:  # [M, N] in x's dtype
    """`reference.fp8_w8a8_linear` with this config."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.dtype == FP8 and weight.stride(1) == 1, (weight.shape, k)
    w_scale = weight_scale.reshape(-1)
    assert w_scale.numel() == n and w_scale.dtype == torch.float32, (weight_scale.shape, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if config.prequant:
        xq, x_scale = quantize_per_token(x)
    else:
        xq, x_scale = x, w_scale  # (x_scale unused: computed in the kernel)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        xq,
        x_scale,
        weight,
        w_scale.contiguous(),
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        k,
        xq.stride(0),
        weight.stride(0),
        out.stride(0),
        X_FP8=config.prequant,
        HAS_BIAS=bias is not None,
        # (warp-group MMA only: 16-row tiles take the older MMA, whose sums are fp32 already)
        PROMOTE=config.block_m >= 64 and _promotes(x.device),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


@functools.cache
def _promotes(device: torch.device) -> bool:
    """Whether the dots need `max_num_imprecise_acc` (Hopper: its FP8 tensor-core adder keeps
    fewer bits than fp32, so each K tile's dot is summed into the fp32 accumulator instead)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def scaled_mm_w8a8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same product on cuBLASLt: `quantize_per_token`, then `torch._scaled_mm` with row-wise
    scales (N and K multiples of 16, bf16 out), the bias added after."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    xq, x_scale = quantize_per_token(x)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1), out_dtype=x.dtype
    )
    return out if bias is None else out + bias


def _bucket(rows: int) -> int:
    """The tuned row count whose choice a call with `rows` rows takes."""
    return next((b for b in ROW_BUCKETS if b >= rows), ROW_BUCKETS[-1])


# (N, K, has_bias, row bucket) -> the config to use; absent or None -> `_scaled_mm`
# (a QuantConfig: the weight-only GEMM, decode buckets only)
_CHOICE: dict[tuple[int, int, bool, int], Fp8Config | QuantConfig | None] = {}


def w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, K] bf16 @ W8A8 weight [N, K] e4m3 (weight_scale [N, 1]) -> [T, N]: the Triton GEMM
    or, for decode-sized T, the weight-only GEMM (x unquantized, `quant_gemm.fp8_weight_only`)
    where `tune_fp8_linear` measured it faster for this shape and row count, else `_scaled_mm`."""
    config = _CHOICE.get((weight.shape[0], weight.shape[1], bias is not None, _bucket(x.shape[0])))
    if isinstance(config, QuantConfig):
        return fp8_weight_only(x, weight, weight_scale, bias, config)
    if config is not None:
        return fp8_gemm(x, weight, weight_scale, bias, config)
    return scaled_mm_w8a8(x, weight, weight_scale, bias)


def chosen(n: int, k: int, has_bias: bool, rows: int) -> Fp8Config | QuantConfig | None:
    """The config `w8a8_linear` uses for this shape and row count (None: `_scaled_mm`)."""
    return _CHOICE.get((n, k, has_bias, _bucket(rows)))


def choose(
    scaled_mm_seconds: float, timed: Sequence[Timed[Fp8Config | QuantConfig]], min_gain: float = MIN_GAIN
) -> Fp8Config | QuantConfig | None:
    """The fastest candidate that is within TOLERANCE of the twin and at least `min_gain` times
    faster than `_scaled_mm`; None (keep `_scaled_mm`) when there is none."""
    best: Fp8Config | QuantConfig | None = None
    best_t = scaled_mm_seconds / min_gain
    for t in timed:
        if t.seconds is None or not t.rel_err < TOLERANCE:
            continue
        if t.seconds <= best_t:
            best, best_t = t.config, t.seconds
    return best


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))


def tune_fp8_linear(
    weights: list[torch.Tensor],  # [N, K] e4m3 each, one shape: the same projection of every layer
    scales: list[torch.Tensor],  # [N, 1] fp32, one per weight
    bias: torch.Tensor | None,  # [N] of the first layer (its presence selects the kernel variant)
    name: str = "",
    rows: Sequence[int] = ROW_BUCKETS,
    reps: int = 20,
) -> list[str]:
    """Time `scaled_mm_w8a8` against each candidate config for each row count of `rows` (each a
    bucket of ROW_BUCKETS) and remember the choice (`choose`). One report line per row count.
    CUDA, FP8 (compute capability >= 8.9), N and K multiples of 16 only: otherwise [] and nothing
    is chosen."""
    w0 = weights[0]
    if (
        not w0.is_cuda
        or torch.cuda.get_device_capability(w0.device) < (8, 9)
        or w0.dtype != FP8
        or w0.dim() != 2
        or w0.shape[0] % 16
        or w0.shape[1] % 16
    ):
        return []
    n, k = w0.shape
    device = w0.device
    flush = l2_flush(device)
    scale_of = {w.data_ptr(): s for w, s in zip(weights, scales, strict=True)}
    gen = torch.Generator(device=device).manual_seed(0)
    lines = []
    for m in rows:
        assert m in ROW_BUCKETS, (m, ROW_BUCKETS)
        key = (n, k, bias is not None, m)
        if key in _CHOICE:
            # Tuned once per process: a second engine with this shape keeps the choice, so its
            # numerics cannot change with timing noise.
            lines.append(f"fp8 {name} {n}x{k} rows={m}: tuned before -> {_CHOICE[key] or '_scaled_mm'}")
            continue
        iters = reps if m <= DECODE_MAX_ROWS else max(reps // 4, 3)
        flush_s = _graph_seconds(lambda i: flush(), iters) / iters
        x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
        ref = reference.fp8_w8a8_linear(x, w0, scales[0], bias).double()
        scaled_err = _rel_err(scaled_mm_w8a8(x, w0, scales[0], bias), ref)
        t_scaled = _time_calls(
            lambda w, x=x: scaled_mm_w8a8(x, w, scale_of[w.data_ptr()], bias), weights, flush, flush_s, iters
        )
        results = [f"_scaled_mm {t_scaled * 1e6:.1f} us (rel err {scaled_err:.1g})"]
        timed: list[Timed[Fp8Config | QuantConfig]] = []
        for config in candidates(m):
            try:
                err = _rel_err(fp8_gemm(x, w0, scales[0], bias, config), ref)
                t: float | None = None
                if err < TOLERANCE:
                    t = _time_calls(
                        lambda w, x=x, c=config: fp8_gemm(x, w, scale_of[w.data_ptr()], bias, c),
                        weights,
                        flush,
                        flush_s,
                        iters,
                    )
                    results.append(f"{config} {t * 1e6:.1f} us")
                else:
                    results.append(f"{config} rejected (rel err {err:.2g})")
            except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
                results.append(f"{config} failed ({type(exc).__name__})")
                t, err = None, float("inf")
            timed.append(Timed(config, t, err))
        if m <= DECODE_MAX_ROWS:
            # Decode-sized calls are bound by the weight stream: FP8 weights against unquantized
            # activations (checked against their own, weight-only twin) may beat both W8A8 GEMMs.
            ref_wo = reference.fp8_linear(x.float(), w0, scales[0], bias).double()
            wo_timed, wo_results = quant_gemm.time_candidates(
                lambda x, w, c: fp8_weight_only(x, w, scale_of[w.data_ptr()], bias, c),
                ref_wo,
                x,
                weights,
                quant_gemm.candidates(m),
                flush,
                flush_s,
                iters,
            )
            timed.extend(wo_timed)
            results += [f"weight-only {r}" for r in wo_results]
        best = choose(t_scaled, timed)
        _CHOICE[key] = best
        if isinstance(best, QuantConfig):  # the quantized GEMM's unfused fallback reads it
            quant_gemm.FP8_WEIGHT_ONLY_CHOICE[key] = best
        lines.append(f"fp8 {name} {n}x{k} rows={m}: " + ", ".join(results) + f" -> {best or '_scaled_mm'}")
    return lines
