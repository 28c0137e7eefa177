"""Paged decode attention: us per call of today's launch rule and of each candidate config.

Default: the shapes of issue 22's batch-1 targets and Llama-3.1-8B, at batch 1 and 8 and contexts
128 / 640 / 1152 / 4096, the way a decode step calls the kernel (batch <= 8: rotary + KV write
fused in, the folded input norm's 1/rms for the models that fold it), each call timed from
CUDA-graph replays of back-to-back calls (no launch latency, L2 warm: what a decode graph sees).
The candidates are `decode_attention_tune.candidates` (the first is today's rule); each output is
checked against the first's.

    python benchmarks/decode_attention_bench.py [--out benchmarks/results/decode_attention_<gpu>.json]
    python benchmarks/decode_attention_bench.py --serving   # the serving-batch sweep (Llama-8B heads)

--serving: achieved bandwidth per tile / launch configuration at serving batch sizes, Llama-3.1-8B
heads (32 query, 8 KV, head_dim 128, block size 16), the contexts scattered over a shuffled cache
like a long-running server's. GB/s counts the K/V bytes of every context plus q and the output,
once; compare it with the copy bandwidth engine_bench.py measures on the same GPU. The first row
of each shape is the default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import median_time

from kernels.ops import AttentionShape
from kernels.triton.decode_attention import LaunchConfig, decode_attention
from kernels.triton.decode_attention_tune import candidates, time_candidates

# (name, shape): issue 22's batch-1 targets (Gemma-3-12B's local and global layers, Qwen3-30B-A3B
# with its q/k norms, whose folded input norm's 1/rms the kernel computes) and Llama-3.1-8B
SMALL_BATCH_SHAPES = (
    ("Gemma-3-12B global", AttentionShape(16, 8, 256)),
    ("Gemma-3-12B local", AttentionShape(16, 8, 256, sliding_window=1024)),
    ("Qwen3-30B-A3B", AttentionShape(32, 4, 128, rms_hidden=2048)),
    ("Llama-3.1-8B", AttentionShape(32, 8, 128, rms_hidden=4096)),
)
SMALL_BATCHES = (1, 8)
SMALL_CONTEXTS = (128, 640, 1152, 4096)

HQ, HKV, D, BS = 32, 8, 128, 16
SHAPES = ((256, 1024), (256, 2048), (192, 2048), (128, 2048), (64, 1024), (32, 4096))
CONFIGS = [
    LaunchConfig(block_n, warps, stages)
    for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
]
SPLITS = (None, 2, 4)  # None: the kernel's default for the batch


def bench_shape(batch: int, context: int, gen: torch.Generator) -> list[dict[str, float | str]]:
    dev = gen.device
    blocks_per_seq = context // BS
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, BS, HKV, D, device=dev, generator=gen, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, device=dev, generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq).contiguous()
    q = torch.randn(batch, HQ, D, device=dev, generator=gen, dtype=torch.bfloat16)
    cu = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    scale = D**-0.5
    reference = decode_attention(q, cache, block_tables, cu, seq_lens, scale)
    nbytes = 2 * batch * context * HKV * D * 2 + 2 * q.numel() * 2
    rows: list[dict[str, float | str]] = []
    for splits, config in itertools.product(SPLITS, [None, *CONFIGS]):
        label = "default" if config is None else f"n{config.block_n} w{config.num_warps} s{config.num_stages}"

        def call(config: LaunchConfig | None = config, splits: int | None = splits) -> torch.Tensor:
            return decode_attention(
                q, cache, block_tables, cu, seq_lens, scale, max_splits=splits, launch=config
            )

        try:
            err = (call().float() - reference.float()).abs().max().item()
            t = median_time(call, q.device, iters=20)
        except Exception as exc:  # a config that does not compile (shared memory): say so, go on
            print(f"  {batch}x{context} splits={splits} {label}: {type(exc).__name__}", flush=True)
            continue
        rows.append(
            {
                "batch": batch,
                "context": context,
                "splits": splits or 0,
                "config": label,
                "us": t * 1e6,
                "GB_per_s": nbytes / t / 1e9,
                "max_abs_err": err,
            }
        )
    return rows


def small_batch(name: str) -> list[dict[str, object]]:
    """The batch-1 / batch-8 table (module docstring): one row per shape, batch, config, context."""
    device = torch.device("cuda")
    rows: list[dict[str, object]] = []
    print(f"{name}: decode attention at small batch, us per call (CUDA graph, L2 warm)")
    print(f"{'shape':<20} {'b':>2} {'config':<22} " + " ".join(f"{c:>7}" for c in SMALL_CONTEXTS))
    for label, shape in SMALL_BATCH_SHAPES:
        configs = candidates(shape.num_q_heads // shape.num_kv_heads, shape.head_dim)
        for batch in SMALL_BATCHES:
            results = time_candidates(shape, batch, SMALL_CONTEXTS, torch.bfloat16, device, configs)
            timed = [(c, t) for c, t in results if not isinstance(t, str)]
            for i, (config, times) in enumerate(results):
                tag = f"{config}{' (today)' if i == 0 else ''}"
                if isinstance(times, str):
                    print(f"{label:<20} {batch:>2} {tag:<22} {times}", flush=True)
                    continue
                print(f"{label:<20} {batch:>2} {tag:<22} " + " ".join(f"{t:7.2f}" for t in times), flush=True)
                for context, us in zip(SMALL_CONTEXTS, times, strict=True):
                    rows.append(
                        {"shape": label, "batch": batch, "context": context, "config": str(config),
                         "today": i == 0, "us": us}
                    )  # fmt: skip
            if timed:
                best = [min(timed, key=lambda item: item[1][j]) for j in range(len(SMALL_CONTEXTS))]
                text = ", ".join(
                    f"{c}: {cfg} {t[j]:.2f}"
                    for j, (c, (cfg, t)) in enumerate(zip(SMALL_CONTEXTS, best, strict=True))
                )
                print(f"{'':<20} {batch:>2} best per context: {text}", flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--serving", action="store_true", help="the serving-batch sweep instead")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    name = torch.cuda.get_device_name()
    if not args.serving:
        small = small_batch(name)
        out = args.out or f"benchmarks/results/decode_attention_small_{name.lower().replace(' ', '-')}.json"
        Path(out).write_text(json.dumps({"gpu": name, "rows": small}, indent=1))
        print("wrote", out)
        return 0
    results = []
    print(f"{name}: decode attention, Llama-3.1-8B heads ({HQ}q/{HKV}kv x {D}), block {BS}")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'config':<14} {'us':>8} {'GB/s':>7}")
    for batch, context in SHAPES:
        rows = bench_shape(batch, context, gen)
        results += rows
        default = rows[0]
        best = sorted(rows, key=lambda r: float(r["us"]))[:5]
        for r in [default, *best]:
            print(
                f"{r['batch']:>5} {r['context']:>5} {r['splits'] or 'auto':>6} {r['config']:<14}"
                f" {float(r['us']):8.1f} {float(r['GB_per_s']):7.0f}"
            )
        torch.cuda.empty_cache()
    out = args.out or f"benchmarks/results/decode_attention_{name.lower().replace(' ', '-')}.json"
    Path(out).write_text(json.dumps({"gpu": name, "rows": results}, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
