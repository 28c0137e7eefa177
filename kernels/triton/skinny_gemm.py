"""Skinny GEMM for decode-sized inputs (T <= 8 rows): y = x @ W.T + b, and the per-shape choice
between it and cuBLAS (F.linear), made by timing both on this GPU.

A batch-1 decode step is a chain of GEMVs whose time is the weight bytes over the bandwidth they
reach. Each program streams BLOCK_N full rows of W (K-contiguous, 16-byte loads, `num_stages`
tiles in flight through shared memory) against the <= 16 input rows padded into one tensor-core
dot; no split-K, so the sum order is fixed and the result deterministic (CUDA graphs on and off
must agree bitwise). Whether this beats cuBLAS depends on the shape and the GPU, so nothing is
assumed: `tune_linear` times both for each weight shape of the model and each row count 1, 2, 4,
8 (weights rotated across layers and L2 flushed before every timed call, as in a real step), and
`linear` then uses the faster. The report lines say what was measured.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.triton import pdl
from kernels.triton.pdl import prefetch_budget_bytes, prefetch_l2

log = logging.getLogger(__name__)

MAX_ROWS = 8  # row counts above this always take cuBLAS (GEMMs there are not bandwidth-bound GEMVs)
# A kernel must beat cuBLAS by this factor to be chosen: smaller gaps are within timing noise.
MIN_GAIN = 1.03


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"triton(n{self.block_n},k{self.block_k},w{self.num_warps},s{self.num_stages})"


CANDIDATES = (
    SkinnyConfig(16, 256, 4, 4),
    SkinnyConfig(32, 256, 4, 4),
    SkinnyConfig(64, 128, 4, 4),
    SkinnyConfig(16, 512, 4, 3),
)


PROLOGUES = ("none", "silu_mul", "rms_norm")
_PROLOGUE_ID = {name: i for i, name in enumerate(PROLOGUES)}


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]; PROLOGUE 1: [M, 2K] gate | up; PROLOGUE 2: the hidden state before its norm
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N]
    res_ptr,  # PROLOGUE 2 with HAS_RESIDUAL: residual [M, K]
    norm_w_ptr,  # PROLOGUE 2: RMSNorm weight [K]
    new_res_ptr,  # PROLOGUE 2 with HAS_RESIDUAL: x + residual [M, K], written by program 0
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_rm,
    stride_nrm,
    eps,
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,  # 0 none, 1 silu(gate) * up, 2 (residual add +) RMSNorm
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_BYTES: tl.constexpr,  # per weight row prefetched into L2 before the PDL wait (0: none)
    PREFETCH_CHUNKS: tl.constexpr,  # pieces each row's prefetch is cut into (one per thread)
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    kk = tl.arange(0, BLOCK_K)
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    if USE_PDL:
        if PREFETCH_BYTES > 0:
            # Weights are never written during a step: stream this program's rows into L2 while
            # the kernels before this one finish (pdl.py).
            chunk = PREFETCH_BYTES // PREFETCH_CHUNKS
            first_row = tl.minimum(cols, N - 1).to(tl.int64) * stride_wn  # masked rows: a valid row
            pieces = tl.arange(0, PREFETCH_CHUNKS).to(tl.int64) * (chunk // 2)  # 2-byte elements
            prefetch_l2((w_ptr + first_row[:, None] + pieces[None, :]).to(tl.int64), chunk)
        gdc_wait()
    if PROLOGUE == 2:
        # RMSNorm statistics of each row (after the residual add, rounded to the input dtype first
        # exactly like the rms_norm kernel); program 0 also writes the new residual.
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            m = row_mask[:, None] & (k < K)[None, :]
            h = tl.load(x_base + k[None, :], mask=m, other=0.0)
            if HAS_RESIDUAL:
                h = h + tl.load(
                    res_ptr + rows[:, None].to(tl.int64) * stride_rm + k[None, :], mask=m, other=0.0
                )
                if pid == 0:
                    tl.store(new_res_ptr + rows[:, None].to(tl.int64) * stride_nrm + k[None, :], h, mask=m)
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, axis=1)
        inv_rms = tl.rsqrt(sum_sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        m = row_mask[:, None] & k_mask[None, :]
        if PROLOGUE == 1:
            # Same rounding as silu_and_mul: silu in fp32, cast, times up in the input dtype.
            gate = tl.load(x_base + k[None, :], mask=m, other=0.0).to(tl.float32)
            up = tl.load(x_base + K + k[None, :], mask=m, other=0.0)
            x = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
        elif PROLOGUE == 2:
            h = tl.load(x_base + k[None, :], mask=m, other=0.0)
            if HAS_RESIDUAL:
                h = h + tl.load(
                    res_ptr + rows[:, None].to(tl.int64) * stride_rm + k[None, :], mask=m, other=0.0
                )
            # As the rms_norm kernel: normalise in fp32, cast, then times the weight in the input dtype.
            normed = (h.to(tl.float32) * inv_rms[:, None]).to(h.dtype)
            x = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0)[None, :] * normed
        else:
            x = tl.load(x_base + k[None, :], mask=m, other=0.0)
        w = tl.load(w_base + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if USE_PDL:
        gdc_launch_dependents()  # after the weights are read: the next GEMM's prefetch cannot evict them
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _prefetch_bytes(n: int, k: int, element_size: int, num_threads: int, block_n: int) -> tuple[int, int]:
    """(bytes per row, chunks per row) of the L2 prefetch: 0 when off, else a multiple of 16 per chunk."""
    # Capped so that one GEMM's prefetch stays well inside L2 (50 MB on H100 / H200).
    budget = prefetch_budget_bytes()
    if budget <= 0:
        return 0, 1
    row = k * element_size
    per_row = min(row, budget // max(n, 1))
    chunks = max(1, num_threads // block_n)
    chunk = (per_row // chunks) // 16 * 16
    if chunk < 128 or row % 16:
        return 0, 1
    return chunk * chunks, chunks


def skinny_gemm(
    x: torch.Tensor,  # [M, K], M <= 16, rows contiguous; prologue "silu_mul": [M, 2K]
    weight: torch.Tensor,  # [N, K] contiguous
    bias: torch.Tensor | None,  # [N]
    config: SkinnyConfig,
    prologue: str = "none",
    residual: torch.Tensor | None = None,  # prologue "rms_norm": [M, K] added to x first
    norm_weight: torch.Tensor | None = None,  # prologue "rms_norm": [K]
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([M, N], prologue "rms_norm" with residual: x + residual)
    """x @ weight.T (+ bias) with fp32 accumulation, rounded once to x's dtype, after an optional
    prologue on x: "silu_mul" (x = silu(x[:, :K]) * x[:, K:]) or "rms_norm" (x = RMSNorm(x +
    residual) * norm_weight, and x + residual returned as the new residual), each with the rounding
    of its stand-alone kernel."""
    num_rows = x.shape[0]
    n, k = weight.shape
    assert weight.stride(1) == 1 and x.stride(1) == 1 and x.dim() == 2, (x.shape, weight.shape)
    assert x.shape[1] == (2 * k if prologue == "silu_mul" else k), (prologue, x.shape, weight.shape)
    assert num_rows <= 16 and x.dtype == weight.dtype, (num_rows, x.dtype, weight.dtype)
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    new_residual = None
    if prologue == "rms_norm":
        assert norm_weight is not None and norm_weight.shape == (k,) and norm_weight.dtype == x.dtype
        if residual is not None:
            assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
            new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return out, new_residual
    use_pdl = pdl.enabled(x.device)
    prefetch, chunks = (
        _prefetch_bytes(n, k, weight.element_size(), 32 * config.num_warps, config.block_n)
        if use_pdl
        else (0, 1)
    )
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        new_residual if new_residual is not None else out,
        num_rows,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        new_residual.stride(0) if new_residual is not None else 0,
        eps,
        HAS_BIAS=bias is not None,
        PROLOGUE=_PROLOGUE_ID[prologue],
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=16,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        USE_PDL=use_pdl,
        PREFETCH_BYTES=prefetch,
        PREFETCH_CHUNKS=chunks,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl.launch_options(x.device),
    )
    return out, new_residual


# (N, K, dtype, has_bias, row bucket, prologue) -> the config to use; absent or None -> cuBLAS
# (after the prologue's stand-alone kernel, for a fused prologue)
_CHOICE: dict[tuple[int, int, torch.dtype, bool, int, str], SkinnyConfig | None] = {}


def _bucket(rows: int) -> int:
    return triton.next_power_of_2(max(rows, 1))


def _config(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: str
) -> SkinnyConfig | None:
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.stride(1) != 1 or not x.is_cuda or weight.stride(1) != 1:
        return None
    return _CHOICE.get(
        (weight.shape[0], weight.shape[1], weight.dtype, bias is not None, _bucket(x.shape[0]), prologue)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [T, K], weight [N, K], bias) -> [T, N]; the skinny kernel where it was measured faster."""
    config = _config(x, weight, bias, "none")
    if config is None:
        return F.linear(x, weight, bias)
    return skinny_gemm(x, weight, bias, config)[0]


def silu_mul_linear(
    x: torch.Tensor,  # [T, 2K] gate | up
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:  # [T, N], or None: compose silu_and_mul and linear instead
    """linear(silu(x[:, :K]) * x[:, K:]) in one kernel, where that was measured faster than the two."""
    config = _config(x, weight, bias, "silu_mul")
    return None if config is None else skinny_gemm(x, weight, bias, config, "silu_mul")[0]


def norm_linear(
    x: torch.Tensor,  # [T, K] hidden state
    residual: torch.Tensor | None,  # [T, K] or None (the first layer: no residual yet)
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # ([T, N], new residual), or None: compose instead
    """(linear(RMSNorm(x + residual)), x + residual) in one kernel (x itself is the new residual when
    residual is None), where that was measured faster than the norm kernel and the linear."""
    config = _config(x, weight, bias, "rms_norm")
    if config is None:
        return None
    out, new_residual = skinny_gemm(x, weight, bias, config, "rms_norm", residual, norm_weight, eps)
    return out, (new_residual if new_residual is not None else x)


def _graph_seconds(body, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Median device seconds of one replay of a CUDA graph of `body(i)` for i < iters. Timing graph
    replays measures what a decode graph sees: no host launch latency between kernels."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body(0)  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(iters):
            body(i)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def _time_calls(fn, weights: list[torch.Tensor], flush: torch.Tensor, flush_s: float, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Device seconds of one fn(weight) on a cold L2 (flushed before each call, the next layer's
    weight each time), from a graph of iters (flush, call) pairs minus the flushes alone."""

    def body(i: int) -> None:
        flush.zero_()
        fn(weights[i % len(weights)])

    return max(_graph_seconds(body, iters) - flush_s * iters, 1e-9) / iters


def _baseline_and_kernel(
    prologue: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
):  # type: ignore[no-untyped-def]
    """(the unfused path as fn(w), the fused kernel as fn(w, config)) for one prologue."""
    from kernels.triton.rms_norm import fused_add_rms_norm
    from kernels.triton.silu_and_mul import silu_and_mul

    if prologue == "silu_mul":
        return (
            lambda w: linear(silu_and_mul(x), w, bias),
            lambda w, c: skinny_gemm(x, w, bias, c, "silu_mul")[0],
        )
    if prologue == "rms_norm":
        assert residual is not None and norm_weight is not None
        return (
            lambda w: linear(fused_add_rms_norm(x, residual, norm_weight, 1e-6)[0], w, bias),
            lambda w, c: skinny_gemm(x, w, bias, c, "rms_norm", residual, norm_weight, 1e-6)[0],
        )
    return (lambda w: F.linear(x, w, bias), lambda w, c: skinny_gemm(x, w, bias, c)[0])


def tune_linear(
    weights: list[torch.Tensor],  # [N, K] each, one shape: the same projection of every layer
    bias: torch.Tensor | None,  # [N] of the first layer (its presence selects the kernel variant)
    max_rows: int = MAX_ROWS,
    name: str = "",
    reps: int = 30,
    prologue: str = "none",
) -> list[str]:
    """Time F.linear against each skinny config for 1, 2, 4, ... max_rows rows; remember the fastest.
    Returns one report line per row count. A config whose output is off (relative error > 1e-2
    against F.linear) is never chosen. CUDA and bf16/fp16 only: otherwise nothing is chosen and []
    is returned. With a `prologue` ("silu_mul", "rms_norm"), the plain projection is tuned first,
    then the fused kernel is timed against the prologue's own kernel followed by that projection."""
    lines: list[str] = []
    if prologue != "none":
        lines = tune_linear(weights, bias, max_rows, name, reps)
        if not lines:
            return []
    w0 = weights[0]
    # fp32 stays on cuBLAS: tl.dot would run it in TF32, a different function from F.linear's.
    if (
        not w0.is_cuda
        or w0.dim() != 2
        or w0.stride(1) != 1
        or w0.dtype not in (torch.bfloat16, torch.float16)
    ):
        return []
    n, k = w0.shape
    device = w0.device
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    flush = torch.empty(l2 // 4, dtype=torch.int32, device=device)  # writing L2's size evicts the weights
    iters = reps
    flush_s = _graph_seconds(lambda i: flush.zero_(), iters) / iters
    gen = torch.Generator(device=device).manual_seed(0)
    rows = 1
    while rows <= min(max_rows, MAX_ROWS):
        width = 2 * k if prologue == "silu_mul" else k
        x = torch.randn(rows, width, device=device, generator=gen).to(w0.dtype)
        residual = torch.randn(rows, k, device=device, generator=gen).to(w0.dtype)
        norm_weight = (1 + 0.1 * torch.randn(k, device=device, generator=gen)).to(w0.dtype)
        baseline, kernel = _baseline_and_kernel(prologue, x, residual, norm_weight, bias)
        ref = baseline(w0).double()
        t_cublas = _time_calls(baseline, weights, flush, flush_s, iters)
        best: SkinnyConfig | None = None
        best_t = t_cublas / _min_gain(device)
        results = [f"{'cuBLAS' if prologue == 'none' else 'unfused'} {t_cublas * 1e6:.1f} us"]
        for config in CANDIDATES:
            try:
                out = kernel(w0, config).double()
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
                if not err < 1e-2:
                    results.append(f"{config} rejected (rel err {err:.2g})")
                    continue
                t = _time_calls(lambda w, c=config, f=kernel: f(w, c), weights, flush, flush_s, iters)
            except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
                results.append(f"{config} failed ({type(exc).__name__})")
                continue
            results.append(f"{config} {t * 1e6:.1f} us")
            if t < best_t:
                best, best_t = config, t
        _CHOICE[(n, k, w0.dtype, bias is not None, rows, prologue)] = best
        nbytes = (n * k + rows * (width + n)) * w0.element_size()
        chosen_t = t_cublas if best is None else best_t
        base = "cuBLAS" if prologue == "none" else "unfused"
        lines.append(
            f"linear {name}{'' if prologue == 'none' else ' + ' + prologue} {n}x{k} rows={rows}: "
            + ", ".join(results)
            + f" -> {base if best is None else best} ({nbytes / chosen_t / 1e9:.0f} GB/s,"
            f" {base} {nbytes / t_cublas / 1e9:.0f} GB/s)"
        )
        rows *= 2
    return lines


def chosen(
    n: int, k: int, dtype: torch.dtype, has_bias: bool, rows: int, prologue: str = "none"
) -> SkinnyConfig | None:
    """The config used for this shape, row count and prologue (None: cuBLAS / unfused)."""
    return _CHOICE.get((n, k, dtype, has_bias, _bucket(rows), prologue))


def _min_gain(device: torch.device) -> float:
    """How much faster than cuBLAS a kernel must time to be chosen. Timed in isolation (after an L2
    flush), the skinny kernel cannot show what PDL gives it inside a step (its weight prefetch
    overlapping the kernels before it; cuBLAS launches without PDL), so with PDL on it is kept
    when within TANDEM_SKINNY_PDL_SLACK (default 5%) of cuBLAS."""
    if pdl.enabled(device):
        return 1.0 / (1.0 + float(os.environ.get("TANDEM_SKINNY_PDL_SLACK", "0.05")))
    return MIN_GAIN
