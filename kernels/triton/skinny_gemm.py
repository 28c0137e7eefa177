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
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton import pdl
from kernels.triton.gelu_and_mul import gelu_tanh, gelu_tanh_and_mul
from kernels.triton.rms_norm import rms_norm
from kernels.triton.silu_and_mul import silu_and_mul, silu_and_mul_rms

log = logging.getLogger(__name__)

# The gated epilogue's activations (`skinny_gemm(..., gated=True, activation=...)`): Llama-style
# SiLU and Gemma's GELU(tanh), each with its unfused kernel (the GEMM, then the activation-and-mul).
ACTIVATIONS = ("silu", "gelu_tanh")
_UNFUSED_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_tanh": gelu_tanh_and_mul,
}
MAX_ROWS = 8  # row counts above this always take cuBLAS (GEMMs there are not bandwidth-bound GEMVs)
# A kernel must beat cuBLAS by this factor to be chosen: smaller gaps are within timing noise.
MIN_GAIN = 1.03
# The residual-add variant (`linear_add`) takes the kernel's best config unless cuBLAS was faster by
# more than this: cuBLAS with beta = 1 (addmm, its fallback) costs more than the kernel's add in
# its epilogue (measured with benchmarks/skinny_bench.py; figures in docs/gpu.md).
RESIDUAL_SAVED_S = 1.5e-6
# `linear(..., early_signal=True)` lets the next kernel launch right after this one's PDL wait
# instead of after its main loop: for a short latency-bound successor (decode attention, SiLU)
# whose pre-wait loads then overlap the whole GEMM (measured faster, docs/gpu.md round 6).


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"triton(n{self.block_n},k{self.block_k},w{self.num_warps},s{self.num_stages})"


# Also measured and not kept (docs/gpu.md, round 4): loading the next weight tile into
# registers before the current dot (it displaces Triton's cp.async pipeline), 32 KB tiles.
CANDIDATES = (
    SkinnyConfig(16, 256, 4, 4),
    SkinnyConfig(32, 256, 4, 4),
    SkinnyConfig(64, 128, 4, 4),
    SkinnyConfig(16, 512, 4, 3),
)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    residual_ptr,  # [M, N] (unused without HAS_RESIDUAL)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # add residual[m] to the result
    EARLY_SIGNAL: tl.constexpr,  # let the next kernel launch right after the wait (pdl.py)
    GATED: tl.constexpr,  # W is [gate; up] (N = 2*I rows): out[m, i] = act(gate[m, i]) * up[m, i]
    GELU: tl.constexpr,  # GATED: act is gelu_tanh (Gemma), else silu
    RMS_EPS: tl.constexpr,  # GATED, M == 1 only (None: off): gate/up scaled by x's rsqrt(mean(x^2) + eps)
    K_PAD: tl.constexpr,  # next_power_of_2(K) (RMS_EPS only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if GATED:
        # BLOCK_N/2 outputs a program: their gate rows, then their up rows (I = N // 2 further down).
        HALF: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        out_j = pid * HALF + j % HALF
        col_mask = out_j < N // 2
        cols = out_j + (j // HALF) * (N // 2)  # the W rows (and bias entries) of the tile
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
    kk = tl.arange(0, BLOCK_K)
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    pdl.enter(PDL)  # see pdl.py
    if EARLY_SIGNAL:
        pdl.leave(PDL)
    if RMS_EPS is not None:
        # The one input row, loaded before the loop and reduced after it (its latency overlaps the
        # weight stream; summing squares inside the loop stops its pipelining, docs/gpu.md round 5).
        kr = tl.arange(0, K_PAD)
        x_row = tl.load(x_ptr + kr, mask=kr < K, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        x = tl.load(x_base + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if not EARLY_SIGNAL:
        pdl.leave(PDL)  # the weights are read: the next kernel may launch and wait on this one
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if RMS_EPS is not None:
            xf = x_row.to(tl.float32)
            acc = acc * tl.rsqrt(tl.sum(xf * xf, axis=0) / K + RMS_EPS)
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), (0, 2, 1)))  # [BLOCK_M, HALF]
        out_cols = pid * HALF + tl.arange(0, HALF)
        if GELU:  # noqa: SIM108 (a constexpr branch in a Triton kernel)
            act = gelu_tanh(gate)
        else:
            act = gate / (1.0 + tl.exp(-gate))
        tl.store(
            out_ptr + rows[:, None].to(tl.int64) * stride_om + out_cols[None, :],
            (act * up).to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & (out_cols < N // 2)[None, :],
        )
        return
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows[:, None].to(tl.int64) * stride_rm + cols[None, :], mask=out_mask, other=0.0
        )
        acc += residual.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


def skinny_gemm(
    x: torch.Tensor,  # [M, K], M <= 16, rows contiguous
    weight: torch.Tensor,  # [N, K] contiguous
    bias: torch.Tensor | None,  # [N]
    config: SkinnyConfig,
    residual: torch.Tensor | None = None,  # [M, N], rows contiguous
    early_signal: bool = False,
    gated: bool = False,
    rms_eps: float | None = None,
    activation: str = "silu",
) -> torch.Tensor:  # [M, N], or [M, N/2] gated
    """x @ weight.T (+ bias) with fp32 accumulation, rounded once to x's dtype.

    residual: added to the result (after the bias), in fp32 before the one rounding.
    early_signal: let the next PDL kernel launch as soon as this one passed its wait.
    gated: weight is a fused [gate; up] projection and the result is silu(gate) * up [M, N/2]
    (SiLU-and-mul in the epilogue, on the fp32 sums; activation "gelu_tanh": GELU(tanh) instead,
    Gemma's MLP); rms_eps (one row only): gate and up are first
    scaled by rsqrt(mean(x^2) + rms_eps) of the input row (the folded post-attention norm)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1 and x.stride(1) == 1, (x.shape, weight.shape)
    assert num_rows <= 16 and x.dtype == weight.dtype, (num_rows, x.dtype, weight.dtype)
    if residual is not None:
        assert residual.shape == (num_rows, n) and residual.stride(1) == 1, (residual.shape, n)
        assert residual.dtype == x.dtype, (residual.dtype, x.dtype)
    assert not gated or (n % 2 == 0 and residual is None), (n, gated)
    assert rms_eps is None or (gated and num_rows == 1), (rms_eps, gated, num_rows)
    assert activation in ACTIVATIONS, activation
    out = torch.empty((num_rows, n // 2 if gated else n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    # A gated program computes block_n / 2 outputs from block_n weight rows (its gate and up rows).
    grid = (triton.cdiv(n // 2, config.block_n // 2) if gated else triton.cdiv(n, config.block_n),)
    _skinny_gemm_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        residual if residual is not None else out,
        out,
        num_rows,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        EARLY_SIGNAL=early_signal,
        GATED=gated,
        GELU=activation == "gelu_tanh",
        RMS_EPS=rms_eps,
        K_PAD=triton.next_power_of_2(k) if rms_eps is not None else 1,
        BLOCK_M=16,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl.launch_options(x.device),
    )
    return out


# (N, K, dtype, has_bias, row bucket) -> the config to use; absent or None -> cuBLAS
_CHOICE: dict[tuple[int, int, torch.dtype, bool, int], SkinnyConfig | None] = {}
# same key -> the config `linear_add` uses (absent: cuBLAS addmm)
_ADD_CHOICE: dict[tuple[int, int, torch.dtype, bool, int], SkinnyConfig] = {}
# (same key (a gate/up weight, one row), activation) -> the config `linear_silu_and_mul` /
# `linear_gelu_and_mul` runs fused (absent: unfused)
_GatedKey = tuple[tuple[int, int, torch.dtype, bool, int], str]
_GATED_CHOICE: dict[_GatedKey, SkinnyConfig] = {}
_GATED_TUNED: set[_GatedKey] = set()  # timed, whatever won (a superset)
_ONES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _bucket(rows: int) -> int:
    return triton.next_power_of_2(max(rows, 1))


def _key(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int, torch.dtype, bool, int] | None:
    """The tuning key of a decode-sized product on CUDA, or None where only cuBLAS applies."""
    if x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and x.is_cuda and weight.stride(1) == 1:
        return (weight.shape[0], weight.shape[1], weight.dtype, bias is not None, _bucket(x.shape[0]))
    return None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, early_signal: bool = False
) -> torch.Tensor:
    """F.linear(x [T, K], weight [N, K], bias) -> [T, N]; the skinny kernel where it was measured faster.

    early_signal: the next kernel is a short latency-bound one (decode attention, SiLU) whose
    pre-wait loads may overlap this whole GEMM (the kernel path only; cuBLAS cannot signal)."""
    key = _key(x, weight, bias)
    config = _CHOICE.get(key) if key is not None else None
    if config is not None:
        return skinny_gemm(x, weight, bias, config, early_signal=early_signal)
    return F.linear(x, weight, bias)


def linear_rms_norm(
    x: torch.Tensor,  # [T, K]: the raw residual stream
    weight: torch.Tensor,  # [N, K]: the projection with the norm's weight folded in (W * g[None, :])
    bias: torch.Tensor | None,  # [N]
    eps: float,
) -> torch.Tensor:  # [T, N]
    """F.linear(x * rsqrt(mean(x^2) + eps), weight, bias): RMSNorm (no weight) and the projection,
    as the norm kernel then `linear`. (The sum of x^2 inside the skinny GEMM's K loop measured
    slower: it stalls the weight stream, docs/gpu.md round 5. In decode steps
    of models without qkv bias / q-k norms the decode attention kernel applies the scale instead:
    paged_attention.decode_scales_rms.)"""
    return linear(rms_norm(x, _ones(x.shape[1], x.dtype, x.device), eps), weight, bias)


def _ones(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached weight of ones for the unweighted norm. Made by `tune_linear` (before any CUDA-graph
    capture: a tensor first filled inside a capture holds nothing until the graph replays)."""
    key = (size, dtype, device)
    if key not in _ONES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("linear_rms_norm's fallback needs its ones vector before CUDA-graph capture")
        _ONES[key] = torch.ones(size, dtype=dtype, device=device)
    return _ONES[key]


def linear_add(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    residual: torch.Tensor,  # [T, N]
) -> torch.Tensor:  # [T, N], a new tensor
    """residual + F.linear(x, weight, bias), summed in fp32 and rounded once: the projection and the
    residual add in one launch (the skinny kernel's epilogue, or cuBLAS's with beta = 1)."""
    key = _key(x, weight, bias)
    config = _ADD_CHOICE.get(key) if key is not None else None
    if config is not None and residual.stride(1) == 1:
        return skinny_gemm(x, weight, bias, config, residual=residual)
    if bias is None:
        return torch.addmm(residual, x, weight.t())
    return F.linear(x, weight, bias) + residual  # (two roundings; no model here has an o/down bias)


def linear_silu_and_mul(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [2*I, K]: the fused [gate; up] projection
    bias: torch.Tensor | None,  # [2*I]
    rms_eps: float | None = None,
) -> torch.Tensor:  # [T, I]
    """silu(gate) * up of gate_up = F.linear(x, weight, bias); with rms_eps, gate and up are first
    scaled by s = rsqrt(mean(x^2) + rms_eps) per row (x is the raw residual stream and the norm's
    weight is folded into `weight`). One kernel (the SiLU in the skinny GEMM's epilogue, on its fp32
    sums) for one row where `tune_linear(gated=True)` measured it faster than the GEMM + SiLU pair;
    otherwise `linear` then `silu_and_mul` (`silu_and_mul_rms`), the GEMM letting SiLU launch early."""
    config = _gated_config(x, weight, bias, "silu")
    if config is not None:
        return skinny_gemm(x, weight, bias, config, gated=True, rms_eps=rms_eps)
    gate_up = linear(x, weight, bias, early_signal=True)
    return silu_and_mul(gate_up) if rms_eps is None else silu_and_mul_rms(gate_up, x, rms_eps)


def linear_gelu_and_mul(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [2*I, K]: the fused [gate; up] projection
    bias: torch.Tensor | None,  # [2*I]
) -> torch.Tensor:  # [T, I]
    """gelu_tanh(gate) * up of gate_up = F.linear(x, weight, bias) (Gemma's MLP): one kernel (the
    GELU in the skinny GEMM's epilogue) for one row where `tune_linear(gated=True,
    activation="gelu_tanh")` measured it faster, otherwise `linear` then `gelu_tanh_and_mul`."""
    config = _gated_config(x, weight, bias, "gelu_tanh")
    if config is not None:
        return skinny_gemm(x, weight, bias, config, gated=True, activation="gelu_tanh")
    return gelu_tanh_and_mul(linear(x, weight, bias, early_signal=True))


def _gated_config(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> SkinnyConfig | None:
    key = _key(x, weight, bias)
    return _GATED_CHOICE.get((key, activation)) if key is not None and x.shape[0] == 1 else None


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


def l2_flush(device: torch.device) -> Callable[[], None]:
    """A call that evicts the weights from L2 before a timed call, as a real step finds them.
    Writing L2's size evicts them. (Evicting by reading twice L2's size instead, which avoids
    charging dirty-line write-back to the call under test, was tried: the same choices for large
    models, and noise that swamps the short GEMMs of small models: docs/gpu.md.)"""
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    buf = torch.empty(l2 // 4, dtype=torch.int32, device=device)

    def flush() -> None:
        buf.zero_()

    return flush


def _time_calls(fn, weights: list[torch.Tensor], flush, flush_s: float, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Device seconds of one fn(weight) on a cold L2 (flushed before each call, the next layer's
    weight each time), from a graph of iters (flush, call) pairs minus the flushes alone."""

    def body(i: int) -> None:
        flush()
        fn(weights[i % len(weights)])

    return max(_graph_seconds(body, iters) - flush_s * iters, 1e-9) / iters


def _time_configs(run, ref, weights, flush, flush_s, iters, results):  # type: ignore[no-untyped-def]
    """(config, device seconds) of run(weight, config) for each candidate config whose output on
    weights[0] is within 1e-2 (relative) of ref; appends one report entry a config to results."""
    timed: list[tuple[SkinnyConfig, float]] = []
    for config in CANDIDATES:
        try:
            out = run(weights[0], config).double()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            if not err < 1e-2:
                results.append(f"{config} rejected (rel err {err:.2g})")
                continue
            t = _time_calls(lambda w, c=config: run(w, c), weights, flush, flush_s, iters)
        except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
            results.append(f"{config} failed ({type(exc).__name__})")
            continue
        results.append(f"{config} {t * 1e6:.1f} us")
        timed.append((config, t))
    return timed


def tune_linear(
    weights: list[torch.Tensor],  # [N, K] each, one shape: the same projection of every layer
    bias: torch.Tensor | None,  # [N] of the first layer (its presence selects the kernel variant)
    max_rows: int = MAX_ROWS,
    name: str = "",
    reps: int = 30,
    gated: bool = False,
    activation: str = "silu",
) -> list[str]:
    """Time F.linear against each skinny config for 1, 2, 4, ... max_rows rows; remember the fastest.
    Returns one report line per row count. A config whose output is off (relative error > 1e-2
    against F.linear) is never chosen. CUDA and bf16/fp16 only: otherwise nothing is chosen and []
    is returned. gated (a fused gate/up weight): also time, for one row, the activation-and-mul
    epilogue kernel (`activation`: "silu" or "gelu_tanh") against the chosen GEMM + the activation
    kernel (`linear_silu_and_mul`, `linear_gelu_and_mul`)."""
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
    _ones(k, w0.dtype, device)  # linear_rms_norm's fallback may need it inside a graph capture
    flush = l2_flush(device)
    iters = reps
    flush_s = _graph_seconds(lambda i: flush(), iters) / iters
    lines = []
    gen = torch.Generator(device=device).manual_seed(0)
    rows = 1
    while rows <= min(max_rows, MAX_ROWS):
        key = (n, k, w0.dtype, bias is not None, rows)
        if key in _CHOICE:
            # Tuned once per process: a second engine (or model) with this shape keeps the choice,
            # so its numerics cannot change with timing noise (kernel and cuBLAS sum differently).
            lines.append(
                f"linear {name} {n}x{k} rows={rows}: kernel vs cuBLAS tuned before -> {_CHOICE[key] or 'cuBLAS'}"
            )
            rows *= 2
            continue
        x = torch.randn(rows, k, device=device, generator=gen).to(w0.dtype)
        ref = F.linear(x, w0, bias).double()
        t_cublas = _time_calls(lambda w, x=x: F.linear(x, w, bias), weights, flush, flush_s, iters)
        best: SkinnyConfig | None = None
        best_t = t_cublas / MIN_GAIN
        fastest: SkinnyConfig | None = None  # the best kernel config, whatever cuBLAS did
        fastest_t = float("inf")
        results = [f"cuBLAS {t_cublas * 1e6:.1f} us"]
        timed = _time_configs(
            lambda w, c, x=x: skinny_gemm(x, w, bias, c), ref, weights, flush, flush_s, iters, results
        )
        for config, t in timed:
            if t < best_t:
                best, best_t = config, t
            if t < fastest_t:
                fastest, fastest_t = config, t
        _CHOICE[key] = best
        add_note = ""
        if fastest is not None and fastest_t <= t_cublas + RESIDUAL_SAVED_S:
            _ADD_CHOICE[key] = fastest
            add_note = f"; with residual {fastest}"
        else:
            _ADD_CHOICE.pop(key, None)
        nbytes = (n * k + rows * (k + n)) * w0.element_size()
        chosen_t = t_cublas if best is None else best_t
        lines.append(
            f"linear {name} {n}x{k} rows={rows}: "
            + ", ".join(results)
            + f" -> {'cuBLAS' if best is None else best} ({nbytes / chosen_t / 1e9:.0f} GB/s,"
            f" cuBLAS {nbytes / t_cublas / 1e9:.0f} GB/s){add_note}"
        )
        rows *= 2
    if gated and n % 2 == 0:
        lines.append(_tune_gated(weights, bias, name, flush, flush_s, iters, gen, activation))
    return lines


def _tune_gated(weights, bias, name, flush, flush_s, iters, gen, activation) -> str:  # type: ignore[no-untyped-def]
    """One row: the fused activation-epilogue kernel against `linear` + the activation-and-mul
    kernel (see tune_linear)."""
    assert activation in ACTIVATIONS, activation
    w0 = weights[0]
    n, k = w0.shape
    key = ((n, k, w0.dtype, bias is not None, 1), activation)
    label, kernel_name = {"silu": ("silu", "SiLU"), "gelu_tanh": ("gelu", "GELU")}[activation]
    if key in _GATED_TUNED:
        return f"linear+{label} {name} {n}x{k} rows=1: tuned before -> {_GATED_CHOICE.get(key) or 'unfused'}"
    _GATED_TUNED.add(key)
    x = torch.randn(1, k, device=w0.device, generator=gen).to(w0.dtype)
    gate_up = F.linear(x, w0, bias).double()
    gate = gate_up[:, : n // 2]
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    ref = act * gate_up[:, n // 2 :]
    unfused = _UNFUSED_ACT[activation]
    t_pair = _time_calls(lambda w: unfused(linear(x, w, bias)), weights, flush, flush_s, iters)
    results = [f"GEMM + {kernel_name} {t_pair * 1e6:.1f} us"]
    best: SkinnyConfig | None = None
    # No noise margin here: the fused kernel saves the activation's launch, which inside a decode graph is
    # worth more than the tuner sees (a fused step timed at par ran no slower, docs/gpu.md round 6).
    best_t = t_pair
    timed = _time_configs(
        lambda w, c: skinny_gemm(x, w, bias, c, gated=True, activation=activation),
        ref,
        weights,
        flush,
        flush_s,
        iters,
        results,
    )
    for config, t in timed:
        if t < best_t:
            best, best_t = config, t
    if best is not None:
        _GATED_CHOICE[key] = best
    return f"linear+{label} {name} {n}x{k} rows=1: " + ", ".join(results) + f" -> {best or 'unfused'}"


def chosen(n: int, k: int, dtype: torch.dtype, has_bias: bool, rows: int) -> SkinnyConfig | None:
    """The config `linear` uses for this shape and row count (None: cuBLAS)."""
    return _CHOICE.get((n, k, dtype, has_bias, _bucket(rows)))
