"""Skinny-GEMM epilogue variants on the GPU: plain and residual add (and cuBLAS with and without
beta = 1), timed the tuner's way (CUDA graph of cold-L2 calls) for Llama-3.1-8B's decode shapes, with the
compiled kernel's registers / shared memory / cp.async count, so a slow variant shows why.

    python benchmarks/skinny_bench.py [--rows 1] [--out benchmarks/results/skinny_<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.triton import skinny_gemm as sg

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "down_proj": (4096, 14336)}


def _compiled_info() -> dict[str, str]:
    """Registers, shared memory and cp.async count of every compiled variant of the kernel."""
    info = {}
    for cache in sg._skinny_gemm_kernel.device_caches.values():
        for key, kernel in cache[0].items():
            ptx = kernel.asm.get("ptx", "")
            info[str(key)[-160:]] = (
                f"regs {kernel.n_regs} spills {kernel.n_spills} shared {kernel.metadata.shared}"
                f" cp.async {ptx.count('cp.async.cg')} stages {kernel.metadata.num_stages}"
            )
    return info


def _bench_shape(name, n, k, rows, gen, flush, flush_s, iters):  # type: ignore[no-untyped-def]
    device = gen.device
    weights = [torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16) * 0.02 for _ in range(8)]
    x = torch.randn(rows, k, device=device, generator=gen).to(torch.bfloat16)
    residual = torch.randn(rows, n, device=device, generator=gen).to(torch.bfloat16)
    variants: dict[str, Callable[..., torch.Tensor]] = {
        "cuBLAS": lambda w: torch.nn.functional.linear(x, w),
        "cuBLAS addmm(residual)": lambda w: torch.addmm(residual, x, w.t()),
    }
    for c in sg.CANDIDATES[:3]:
        variants[f"{c} plain"] = lambda w, c=c: sg.skinny_gemm(x, w, None, c)
        variants[f"{c} residual"] = lambda w, c=c: sg.skinny_gemm(x, w, None, c, residual=residual)
    out = []
    for variant, fn in variants.items():
        t = sg._time_calls(fn, weights, flush, flush_s, iters)
        out.append({"shape": name, "variant": variant, "us": t * 1e6})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    flush = sg.l2_flush(device)
    iters = 30
    flush_s = sg._graph_seconds(lambda i: flush(), iters) / iters
    results = []
    for name, (n, k) in SHAPES.items():
        results += _bench_shape(name, n, k, args.rows, gen, flush, flush_s, iters)
    for row in results:
        print(f"{row['shape']:<10} {row['variant']:<40} {row['us']:7.1f} us")
    info = _compiled_info()
    for key, line in info.items():
        print(f"compiled {line} :: {key}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rows": args.rows, "results": results, "compiled": info}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
