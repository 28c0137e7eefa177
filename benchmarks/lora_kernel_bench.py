"""The multi-LoRA kernels alone: one decode step's LoRA work (shrink then expand of the 4 fused
projections of every layer, Llama-3.1-8B shapes, rank 16 on all seven modules) under each
`LoRAKernelConfig` candidate, at several batch sizes mixing 16 adapters.

    python benchmarks/lora_kernel_bench.py          # GPU: the candidates below, rows 16/32/64
    python benchmarks/lora_kernel_bench.py --configs "expand_columns=512 k_chunk=1024"
    python benchmarks/lora_kernel_bench.py --smoke  # CPU interpreter, tiny shapes: checks the script

The engine-level figure is benchmarks/lora_bench.py (its --kernel-configs reruns the mixed row under
a config); this one is the fast way to choose the candidates worth that: seconds of device time per
config. Each projection's 32 layers have their own slot pools (1.3 GB for 16 adapters: the L2 holds
none of it, as in a real step), and the timed CUDA graph runs the projection's shrink then expand
for every layer, one after the other (no base GEMM beside them: this measures the LoRA kernels'
own time, the critical path the expands are on, and what the shrinks cost when they do not
overlap). Every config's output is checked against the reference twins first. Rows: batch size,
config, us per layer for qkv / o / gate_up / down, and ms per step (all 32 layers).
The JSON goes to benchmarks/results/lora_kernels_<gpu>_<date>.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_report import device_label, write_report  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.triton import lora  # noqa: E402

# a batch's adapter mapping (kernels/reference.py lora_segments): sorted token ids, segment starts,
# segment lengths
Mapping = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# (name, in features, part widths): Llama-3.1-8B's fused projections
PROJECTIONS = {
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
SMOKE_PROJECTIONS = {
    "qkv": (64, (64, 16, 16)),
    "o": (64, (64,)),
    "gate_up": (64, (96, 96)),
    "down": (96, (64,)),
}
CANDIDATES = (
    "",  # the default
    "expand_columns=256",
    "expand_columns=512",
    "expand_columns=1024",
    "k_chunk=1024",
    "k_chunk=1024,expand_columns=512",
    "k_chunk=256",
    "num_warps=8,expand_columns=512",
    "num_warps=2",
)


class Projection:
    """One fused projection's per-layer slot pools and a batch's inputs."""

    def __init__(
        self, k: int, parts: tuple[int, ...], args: argparse.Namespace, rows: int, gen: torch.Generator
    ) -> None:
        dev, dt = args.device, args.dtype
        self.parts, self.rank = parts, args.rank
        self.starts = tuple(sum(parts[:j]) for j in range(len(parts)))
        n, width = sum(parts), len(parts) * args.rank
        self.a = [
            (torch.randn(args.adapters, width, k, generator=gen) / k**0.5).to(dev, dt)
            for _ in range(args.layers)
        ]
        self.b = [
            (torch.randn(args.adapters, n, args.rank, generator=gen) * 0.02).to(dev, dt)
            for _ in range(args.layers)
        ]
        self.x = torch.randn(rows, k, generator=gen).to(dev, dt)
        self.y = torch.randn(rows, n, generator=gen).to(dev, dt)

    def step(self, mapping: Mapping) -> None:
        for a, b in zip(self.a, self.b, strict=True):
            t = lora.lora_shrink(self.x, a, *mapping)
            lora.lora_expand(self.y, t, b, *mapping, self.starts, self.rank)

    def check(self, mapping: Mapping) -> float:
        """Relative error of layer 0's output against the reference twins'."""
        y, y_ref = self.y.clone(), self.y.clone()
        lora.lora_expand(
            y, lora.lora_shrink(self.x, self.a[0], *mapping), self.b[0], *mapping, self.starts, self.rank
        )
        t_ref = reference.lora_shrink(self.x, self.a[0], *mapping)
        reference.lora_expand(y_ref, t_ref, self.b[0], *mapping, self.starts, self.rank)
        return float((y - y_ref).double().norm() / y_ref.double().norm())


def graph_us(body: Any, repeats: int = 5) -> float:
    """Median device us of one replay of a CUDA graph of body()."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the script"
    )
    parser.add_argument("--rows", default="16,32,64", help="batch sizes (comma-separated)")
    parser.add_argument("--adapters", type=int, default=16, help="adapters mixed in each batch (slots)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--configs",
        default=" ".join(c or "default" for c in CANDIDATES),
        help="space-separated LoRAKernelConfigs",
    )
    parser.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/lora_kernels_<gpu>_<date>.json)"
    )
    args = parser.parse_args(argv)
    try:
        configs = [lora.LoRAKernelConfig.parse("" if c == "default" else c) for c in args.configs.split()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        args.rows, args.adapters, args.layers = "12", 3, 1
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    device_name = device_label(args.device)
    shapes = SMOKE_PROJECTIONS if args.smoke else PROJECTIONS
    results: list[dict[str, Any]] = []
    default = lora.config()
    print(f"{device_name}: LoRA kernels, rank {args.rank}, {args.adapters} adapters, {args.layers} layers")
    print(f"  {'rows':>4}  {'config':<44}" + "".join(f"{n:>9}" for n in shapes) + "   ms/step")
    for rows in (int(r) for r in args.rows.split(",")):
        gen = torch.Generator().manual_seed(rows)
        projections = {name: Projection(k, parts, args, rows, gen) for name, (k, parts) in shapes.items()}
        token_slots = [i % args.adapters for i in range(rows)]  # interleaved, as lora_bench mixes them
        ids, starts, lens = (
            torch.tensor(v, dtype=torch.int32, device=args.device)
            for v in reference.lora_segments(token_slots, args.adapters)
        )
        mapping: Mapping = (ids, starts, lens)
        for config in configs:
            lora.set_config(config)
            try:
                errors = {name: p.check(mapping) for name, p in projections.items()}
                bad = {name: e for name, e in errors.items() if not e < (1e-5 if args.smoke else 1e-2)}
                if bad:
                    raise AssertionError(f"{config} at {rows} rows: against the reference twins {bad}")
                per_layer: dict[str, float] = {}
                for name, p in projections.items():
                    if args.device == "cuda":
                        per_layer[name] = graph_us(lambda p=p, m=mapping: p.step(m)) / args.layers
                    else:
                        p.step(mapping)  # (the interpreter: runs, not timed)
                        per_layer[name] = 0.0
            finally:
                lora.set_config(default)
            step_ms = sum(per_layer.values()) * args.layers / 1e3
            results.append(
                {"rows": rows, "config": str(config), "us_per_layer": per_layer, "ms_per_step": step_ms}
            )
            print(
                f"  {rows:>4}  {config!s:<44}"
                + "".join(f"{v:9.1f}" for v in per_layer.values())
                + f"{step_ms:10.3f}",
                flush=True,
            )
    best = {}
    for rows in sorted({r["rows"] for r in results}):
        of_rows = [r for r in results if r["rows"] == rows]
        best[rows] = min(of_rows, key=lambda r: r["ms_per_step"])["config"]
        print(f"  fastest at {rows} rows: {best[rows]}")
    out = write_report(
        "lora_kernels",
        device_name,
        args.smoke,
        args.out,
        {
            "rank": args.rank,
            "adapters": args.adapters,
            "layers": args.layers,
            "rows": results,
            "fastest": best,
        },
    )
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
