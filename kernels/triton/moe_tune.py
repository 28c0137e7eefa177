"""The decode MoE kernels' tile configs, measured on this GPU at engine start.

`tune_moe` times each candidate config of the two decode kernels (fused_moe.launch_gate_up and
launch_down) at batch 1 for a model's expert shape: k distinct experts (as a batch-1 routing),
every layer's experts rotated and L2 flushed before each timed call (as a decode step finds them,
skinny_gemm._time_calls). A candidate's output must match the reference before it is timed; the
fastest of each kernel goes into fused_moe.DECODE_CHOICE, which every decode-sized fused_moe of
that shape then uses. The report lines give each candidate's time and the bandwidth it reached.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.triton.fused_moe import (
    DECODE_CHOICE,
    DecodeConfig,
    decode_key,
    default_decode_configs,
    launch_down,
    launch_gate_up,
)
from kernels.triton.skinny_gemm import _graph_seconds, _time_calls, l2_flush

GATE_UP_CANDIDATES = (
    DecodeConfig(32, 256, 4, 4),
    DecodeConfig(64, 128, 4, 4),
    DecodeConfig(32, 512, 4, 3),
    DecodeConfig(64, 256, 4, 3),
)
# The down GEMV has fewer programs than gate_up (Qwen3-30B-A3B at batch 1: 2048 / 16 = 128, one
# per SM, each a chain of k * I / BLOCK_K = 24 dependent tile steps; gate_up: 384 programs of 8
# steps): the split configs run 2 or 4 programs per output tile, each a slice of the K loop
# (2-4 programs an SM, more weight bytes in flight), the last to finish summing the partials.
# The tuner keeps the unsplit configs wherever a split measures slower.
DOWN_CANDIDATES = (
    DecodeConfig(16, 256, 4, 4),
    DecodeConfig(16, 512, 4, 3),
    DecodeConfig(32, 256, 4, 4),
    DecodeConfig(16, 128, 4, 6),
    DecodeConfig(16, 256, 4, 4, split=2),
    DecodeConfig(32, 256, 4, 4, split=2),
    DecodeConfig(16, 512, 4, 3, split=2),
    DecodeConfig(16, 256, 4, 4, split=4),
)
# relative error against the fp64 reference a candidate may have (bf16 roundings of the inputs'
# products and of the activation: ~1e-2; a wrong kernel is off by ~1)
TOLERANCE = 0.05


def tune_moe(
    w13s: list[torch.Tensor],  # [E, 2*I, H]: every MoE layer's stacked gate/up weights (one shape)
    w2s: list[torch.Tensor],  # [E, H, I]
    w13_biases: list[torch.Tensor] | None,  # [E, 2*I] per layer (gpt-oss), or None
    w2_biases: list[torch.Tensor] | None,  # [E, H] per layer, or None (also: not this rank's to add)
    top_k: int,
    activation: str = "silu",
    name: str = "experts",
    reps: int = 20,
) -> list[str]:
    """Measure the candidates (module docstring) and keep the fastest; CUDA only (else [] and the
    default rules stay). Report lines: one per kernel."""
    w13 = w13s[0]
    if not w13.is_cuda:
        return []
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    has_bias = w13_biases is not None
    key = decode_key(w13, top_k, has_bias)
    shape = f"moe {name} E={experts} {two_inter}x{hidden} k={top_k}"
    if key in DECODE_CHOICE:  # tuned once per process: a second engine keeps the choice
        return [f"{shape}: tuned before -> {DECODE_CHOICE[key]}"]
    device = w13.device
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, hidden, device=device, generator=gen).to(w13.dtype)
    ids = torch.randperm(experts, device=device, generator=gen)[:top_k].contiguous()
    weights = torch.softmax(torch.randn(top_k, device=device, generator=gen), 0)
    act = torch.empty((top_k, inter), dtype=w13.dtype, device=device)
    out = torch.empty((1, hidden), dtype=w13.dtype, device=device)
    index = {w.data_ptr(): i for i, w in enumerate(w13s)} | {w.data_ptr(): i for i, w in enumerate(w2s)}

    def b13(i: int) -> torch.Tensor | None:
        return w13_biases[i] if w13_biases is not None else None

    def b2(i: int) -> torch.Tensor | None:
        return w2_biases[i] if w2_biases is not None else None

    # the reference over the k routed experts only (renumbered 0..k-1): no fp64 copy of all E
    def routed(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[ids].double() if t is not None else None

    ref = reference.fused_moe(
        x.double(), w13[ids].double(), w2s[0][ids].double(), weights[None].double(),
        torch.arange(top_k, device=device)[None], routed(b13(0)), routed(b2(0)), activation,
    )  # fmt: skip
    default_up, default_down = default_decode_configs(hidden, inter)
    flush = l2_flush(device)
    flush_s = _graph_seconds(lambda i: flush(), 10) / 10

    def run_up(w: torch.Tensor, config: DecodeConfig) -> None:
        i = index[w.data_ptr()]
        launch_gate_up(x, w, b13(i), ids, weights, act, top_k, activation, config)

    def run_down(w: torch.Tensor, config: DecodeConfig) -> None:
        launch_down(act, w, b2(index[w.data_ptr()]), ids, weights, out, top_k, config)

    def err(up: DecodeConfig, down: DecodeConfig) -> float:
        run_up(w13, up)
        run_down(w2s[0], down)
        return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))

    lines = []
    chosen: list[DecodeConfig] = []
    kernels = (
        ("gate_up", GATE_UP_CANDIDATES, w13s, run_up, top_k * two_inter * hidden),
        ("down", DOWN_CANDIDATES, w2s, run_down, top_k * hidden * inter),
    )
    for kernel, candidates, layer_weights, run, elements in kernels:
        results, best, best_s = [], None, float("inf")
        for config in candidates:
            pair = (config, default_down) if kernel == "gate_up" else (default_up, config)
            try:
                e = err(*pair)
                if e >= TOLERANCE:
                    results.append(f"{config} rejected (rel err {e:.2g})")
                    continue
                run_up(w13, pair[0])  # the down kernel's input, for its timing
                seconds = _time_calls(lambda w, c=config, r=run: r(w, c), layer_weights, flush, flush_s, reps)
            except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
                results.append(f"{config} failed ({type(exc).__name__})")
                continue
            gbps = elements * w13.element_size() / seconds / 1e9
            results.append(f"{config} {seconds * 1e6:.1f} us ({gbps:.0f} GB/s)")
            if seconds < best_s:
                best, best_s = config, seconds
        default = default_up if kernel == "gate_up" else default_down
        chosen.append(best or default)
        lines.append(f"{shape} {kernel}: " + ", ".join(results) + f" -> {best or default}")
    DECODE_CHOICE[key] = (chosen[0], chosen[1])
    return lines
