"""Where a prompt's prefill step spends its time: the host's launch work or the device's kernels.

For each model shape and prompt length, the engine (dummy weights, prefix caching off) runs a
fresh prompt with max_tokens=1 several times, and the script reports per prefill:

- wall: the whole prefill (engine.step until the request ends, first token read back);
- device busy: the sum of the kernels' device times (torch.profiler, CUDA activity);
- kernels: how many the prefill launched, and the top kernels by device time;
- host share: 1 - busy / wall, the part of the wall time the device had nothing to run (a prefill
  whose host launch work outruns its kernels is host-bound: its wall time is the host's).

A host-bound prefill costs the split twice: its own time, and the event loop's turns at the GIL
that delay its launches (docs/benchmarks.md, the split's first token).

    python benchmarks/prefill_profile.py --models Qwen2-0.5B --lengths 128,1024,2048

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import (  # noqa: E402
    FULL,
    MODELS,
    SMOKE,
    free_engine,
    make_engine,
    random_prompt,
    tiny,
    write_model,
)
from services.worker.engine import Engine  # noqa: E402
from services.worker.request import EngineRequest, SamplingParams  # noqa: E402


def prefill_once(engine: Engine, request_id: str, prompt: list[int]) -> float:
    """Wall seconds of one prompt's prefill (max_tokens 1: the step that samples its token)."""
    params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.add_request(EngineRequest(request_id, tuple(prompt), params))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def profile_length(
    engine: Engine, vocab: int, length: int, gen: torch.Generator, repeats: int
) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):  # warm-up: compiles, tuner choices, allocator
        prefill_once(engine, f"w{length}-{i}", random_prompt(gen, length, vocab))
    walls = [
        prefill_once(engine, f"t{length}-{i}", random_prompt(gen, length, vocab)) for i in range(repeats)
    ]
    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(repeats):
            prefill_once(engine, f"p{length}-{i}", random_prompt(gen, length, vocab))
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if cuda and ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            entry = kernels.setdefault(ev.name[:60], [0.0, 0.0])
            entry[0] += 1
            entry[1] += ev.device_time
    busy_us = sum(v[1] for v in kernels.values()) / repeats
    host_ops = sorted(
        (a for a in prof.key_averages() if a.self_cpu_time_total > 0),
        key=lambda a: -a.self_cpu_time_total,
    )[:12]
    wall_ms = statistics.median(walls) * 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "length": length,
        "wall_ms": wall_ms,
        "walls_ms": [w * 1e3 for w in walls],
        "device_busy_ms": busy_us / 1e3,
        "kernels": sum(v[0] for v in kernels.values()) / repeats,
        "host_share": 1.0 - busy_us / 1e3 / wall_ms if cuda else None,
        "host_ops": [
            {"op": a.key[:60], "calls": a.count / repeats, "self_us": a.self_cpu_time_total / repeats}
            for a in host_ops
        ],
        "top": [{"kernel": name, "calls": calls / repeats, "us": us / repeats} for name, (calls, us) in top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="Qwen2-0.5B", help="comma-separated subset of " + ", ".join(MODELS)
    )
    parser.add_argument("--lengths", default="128,1024,2048", help="prompt lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills a length")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs (decode); prefill is eager anyway"
    )
    parser.add_argument(
        "--prefill-graph-max-tokens",
        default="",
        help="comma-separated values of the worker's flag to compare (e.g. 0,2048: eager, graphs); default: the worker's",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script in seconds")
    parser.add_argument("--out", default="", help="JSON path")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    plan = SMOKE if args.smoke else FULL
    lengths = [int(x) for x in args.lengths.split(",") if x]
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            cfg = tiny(MODELS[name]) if args.smoke else MODELS[name]
            model_dir = write_model(Path(tmp), name, cfg)
            values: list[int | None] = [int(x) for x in args.prefill_graph_max_tokens.split(",") if x]
            for graph_tokens in values or [None]:
                engine = make_engine(
                    model_dir, device, plan, max_num_seqs=8, max_model_len=max(lengths) + 16,
                    enforce_eager=args.enforce_eager, max_num_batched_tokens=max(max(lengths), 2048),
                    prefill_graph_max_tokens=graph_tokens,
                )  # fmt: skip
                graphs = engine.runner.prefill_graphs
                label = "eager" if graphs is None else f"graphs<={graphs.max_tokens}"
                if graphs is None and graph_tokens:
                    print(f"{name}: prefill graphs off: {engine.runner.prefill_graphs_off}", flush=True)
                if graphs is not None:
                    print(
                        f"{name}: {len(graphs.sizes)} buckets captured in {graphs.capture_seconds:.1f} s,"
                        f" {graphs.capture_bytes / 2**20:.0f} MiB",
                        flush=True,
                    )
                for length in lengths:
                    row = profile_length(engine, cfg["vocab_size"], length, gen, args.repeats)
                    row["model"] = name
                    row["prefill_graphs"] = label
                    if graphs is not None:
                        row["capture_s"] = graphs.capture_seconds
                        row["capture_mib"] = graphs.capture_bytes / 2**20
                    results.append(row)
                    share = "-" if row["host_share"] is None else f"{row['host_share']:.2f}"
                    print(
                        f"{name} [{label}] prefill {length}: wall {row['wall_ms']:.2f} ms, device busy"
                        f" {row['device_busy_ms']:.2f} ms, {row['kernels']:.0f} kernels, host share {share}",
                        flush=True,
                    )
                    for k in row["top"]:
                        print(f"    {k['kernel']:<60} {k['calls']:6.0f} calls {k['us']:9.1f} us", flush=True)
                    print("  host (profiled, self time):", flush=True)
                    for o in row["host_ops"]:
                        print(f"    {o['op']:<60} {o['calls']:6.0f} calls {o['self_us']:9.1f} us", flush=True)
                free_engine(engine)  # (gc too: the next engine's capture needs the memory)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
