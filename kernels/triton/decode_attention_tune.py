"""The decode attention kernel's LaunchConfig per attention shape, measured on this GPU at engine start.

At batch 1-8 the decode kernel is latency-bound (docs/gpu.md, "Decode attention at batch 1"): its
time is the chain metadata -> block table -> K/V tile -> dots -> partial store -> arrival counter
-> merge, not the bytes it reads, and which tile / warps / split rule shortens that chain best
depends on the GPU and the shape. `tune_decode_attention` times `candidates` for each attention
shape of the model (heads, head dim, sliding window) and each decode batch bucket (a power of
two up to 8: the batches whose decode step runs rotary + KV write in this kernel) inside CUDA
graphs, L2 warm as in a decode step, summed over a short and a long context, checks each
candidate's output against today's rule first, and keeps the fastest in `CHOICE` when it beats
today's rule by MARGIN. The choice is keyed by the batch's power of two, so a batch run eagerly
and the same batch padded to a graph's size run the same config (graphs on/off stay bitwise equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from kernels.ops import AttentionShape
from kernels.triton.decode_attention import (
    CHOICE,
    MAX_SPLITS,
    LaunchConfig,
    RotaryKV,
    decode_attention,
    decode_key,
    default_launch,
    split_cap,
)
from kernels.triton.paged_attention import FUSED_ROPE_MAX_TOKENS
from kernels.triton.skinny_gemm import _graph_seconds

# a candidate must be this much faster than today's rule to replace it (run-to-run noise)
MARGIN = 0.97
# relative error against today's rule's output a candidate may have (bf16 roundings of P; a
# wrong kernel is off by ~1)
TOLERANCE = 2e-2
BLOCK_SIZE = 16
BATCHES = (1, 2, 4, 8)  # the decode batch buckets (powers of two) up to FUSED_ROPE_MAX_TOKENS
CONTEXTS = (640, 2048)  # the sum of both is timed: a short decode and a long one


def candidates(group: int, head_dim: int) -> list[LaunchConfig]:
    """Today's rule first, then the variants worth timing for a GQA group and head dim:
    - 8 warps: the merge's [group, splits, head_dim] fp32 tile over twice the threads (group 8 x
      16 splits x 128 is 128 registers a thread with 4 warps);
    - head dim 256: 64-token tiles with 8 warps, so a 64-token split is one tile loaded before
      the PDL wait (today's 32-token tiles load its second half after the wait);
    - head dim <= 128: 32-token splits of one 32-token tile (more, shorter splits at batch 1);
    - at most 8 or 4 splits: a half / a quarter of the merge's reads, for longer splits;
    - up to 32 splits of one tile each, where the merge tile allows (decode_attention.split_cap);
    - CUDA-core dots over the group's rows (no padding to 16 rows), where the group x tile x head
      dim products fit in <= 64 registers a thread."""
    base = default_launch(head_dim, on_gpu=True)
    wide = triton.next_power_of_2(head_dim) > 128
    out = [
        base,
        LaunchConfig(base.block_n, 8, base.num_stages),
        LaunchConfig(64, 8, 2) if wide else LaunchConfig(32, 4, 2, min_split_len=32),
        LaunchConfig(base.block_n, 8, base.num_stages, max_splits=8),
        LaunchConfig(base.block_n, 8, base.num_stages, max_splits=4),
    ]
    if split_cap(group, head_dim) > MAX_SPLITS:  # up to 32 one-tile splits
        out.append(
            LaunchConfig(64, 8, 2, max_splits=2 * MAX_SPLITS)
            if wide
            else LaunchConfig(32, 4, 2, min_split_len=32, max_splits=2 * MAX_SPLITS)
        )
    rows = triton.next_power_of_2(group)
    d_pad = triton.next_power_of_2(head_dim)
    for warps in (4, 8):
        fitting = [n for n in (64, 32, 16) if rows * n * d_pad <= 64 * 32 * warps]
        if fitting:
            out.append(LaunchConfig(fitting[0], warps, 2, tensor_core=False))
    return out


@dataclass
class DecodeInputs:
    """A decode step's attention inputs for `batch` sequences on a shuffled paged cache whose block
    tables cover `max_context` tokens (a graph's tables are as wide as the longest sequence allowed)."""

    q: torch.Tensor
    cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    rotary: RotaryKV | None
    sinks: torch.Tensor | None

    def set_context(self, context: int) -> None:
        self.seq_lens.fill_(context)
        if self.rotary is not None:
            self.rotary.positions.fill_(context - 1)
            rows = torch.arange(self.q.shape[0], device=self.q.device)
            pos = context - 1
            blocks = self.block_tables[rows, pos // BLOCK_SIZE].long()
            self.rotary.slot_mapping.copy_(blocks * BLOCK_SIZE + pos % BLOCK_SIZE)


def make_inputs(
    shape: AttentionShape,
    batch: int,
    max_context: int,
    dtype: torch.dtype,
    device: torch.device,
    fused_rotary: bool = True,
) -> DecodeInputs:
    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    blocks_per_seq = triton.cdiv(max_context, BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, hkv, d, device=device, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    q = torch.randn(batch, hq, d, device=device, generator=gen).to(dtype)
    rotary = None
    if fused_rotary:
        k = torch.randn(batch, hkv, d, device=device, generator=gen).to(dtype)
        v = torch.randn(batch, hkv, d, device=device, generator=gen).to(dtype)
        cos_sin = torch.randn(max_context, d, device=device, generator=gen).to(dtype)
        hidden = (
            torch.randn(batch, shape.rms_hidden, device=device, generator=gen).to(dtype)
            if shape.rms_hidden
            else None
        )
        slots = torch.zeros(batch, dtype=torch.int64, device=device)
        positions = torch.zeros(batch, dtype=torch.int64, device=device)
        rotary = RotaryKV(k, v, slots, positions, cos_sin, hidden, 1e-6)
    sinks = torch.randn(hq, device=device, generator=gen) if shape.sinks else None
    inputs = DecodeInputs(
        q,
        cache,
        perm.view(batch, blocks_per_seq).contiguous(),
        torch.arange(batch + 1, device=device, dtype=torch.int32),
        torch.empty(batch, dtype=torch.int32, device=device),
        rotary,
        sinks,
    )
    inputs.set_context(max_context)
    return inputs


def runner(
    shape: AttentionShape, inputs: DecodeInputs, launch: LaunchConfig | None
) -> Callable[[], torch.Tensor]:
    """One decode attention call of `shape` over `inputs` (`launch` None: the module's choice)."""
    scale = shape.head_dim**-0.5
    out = torch.empty_like(inputs.q)

    def call() -> torch.Tensor:
        return decode_attention(
            inputs.q, inputs.cache, inputs.block_tables, inputs.cu_seqlens_q, inputs.seq_lens, scale,
            rotary=inputs.rotary, launch=launch, out=out, sliding_window=shape.sliding_window,
            soft_cap=shape.soft_cap, sinks=inputs.sinks,
        )  # fmt: skip

    return call


def graph_us(call: Callable[[], object], reps: int) -> float:
    """Microseconds of one call, from CUDA-graph replays of `reps` back-to-back calls (no launch
    latency between them, L2 warm: a decode step's reality for these small reads)."""
    return _graph_seconds(lambda i: call(), reps) / reps * 1e6


def time_candidates(
    shape: AttentionShape,
    batch: int,
    contexts: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    configs: list[LaunchConfig],
    reps: int = 20,
) -> list[tuple[LaunchConfig, list[float] | str]]:
    """(config, us per call at each context) for each config, or (config, why it was rejected);
    configs[0] is the one the others' outputs are checked against."""
    fused = batch <= FUSED_ROPE_MAX_TOKENS  # as a decode step calls it (paged_attention.py)
    inputs = make_inputs(shape, batch, max(contexts), dtype, device, fused_rotary=fused)
    results: list[tuple[LaunchConfig, list[float] | str]] = []
    refs = []
    for context in contexts:
        inputs.set_context(context)
        refs.append(runner(shape, inputs, configs[0])().float().clone())
    for config in configs:
        call = runner(shape, inputs, config)
        try:
            times = []
            for context, ref in zip(contexts, refs, strict=True):
                inputs.set_context(context)
                out = call().float()
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
                if not err < TOLERANCE:
                    raise ValueError(f"rel err {err:.2g}")
                times.append(graph_us(call, reps))
        except Exception as exc:  # a config this GPU cannot compile or run is skipped, not fatal
            results.append((config, f"{type(exc).__name__}: {exc}"[:80]))
            continue
        results.append((config, times))
    return results


def tune_decode_attention(
    shapes: list[AttentionShape],
    dtype: torch.dtype,
    device: torch.device,
    max_batch: int = FUSED_ROPE_MAX_TOKENS,
    reps: int = 20,
) -> list[str]:
    """Measure each shape's candidates at each batch bucket up to `max_batch` and keep the fastest
    in CHOICE (module docstring); CUDA only (else [] and today's rule stays). One report line per
    shape and bucket."""
    if device.type != "cuda":
        return []
    lines = []
    for shape in dict.fromkeys(shapes):
        group = shape.num_q_heads // shape.num_kv_heads
        configs = candidates(group, shape.head_dim)
        for batch in (b for b in BATCHES if b <= max_batch):
            key = decode_key(
                shape.num_q_heads, shape.num_kv_heads, shape.head_dim, dtype, shape.sliding_window, batch
            )
            label = f"decode attention {shape} batch {batch}"
            if key in CHOICE:  # tuned once per process: a second engine keeps the choice
                lines.append(f"{label}: tuned before -> {CHOICE[key]}")
                continue
            results = time_candidates(shape, batch, CONTEXTS, dtype, device, configs, reps)
            timed = [(c, sum(t)) for c, t in results if not isinstance(t, str)]
            default_us = next((us for c, us in timed if c == configs[0]), float("inf"))
            best, best_us = min(timed, key=lambda item: item[1], default=(configs[0], default_us))
            chosen = best if best_us < MARGIN * default_us else configs[0]
            CHOICE[key] = chosen
            parts = [f"{c}: {t}" if isinstance(t, str) else f"{c} {sum(t):.1f} us" for c, t in results]
            lines.append(
                f"{label} (us summed over contexts {CONTEXTS}): " + ", ".join(parts) + f" -> {chosen}"
            )
        torch.cuda.empty_cache()
    return lines
