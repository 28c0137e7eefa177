"""Triton compiles while serving: the kernel variants each wave of requests compiles (GPU).

Triton compiles a kernel for every new combination of its constexprs and of its integer
arguments' specializations (a variant for the value 1, one for multiples of 16, one for the rest,
unless the kernel says `do_not_specialize`). A variant first met while serving is compiled on the
engine thread: tens to hundreds of milliseconds during which no request of the batch advances.
This script starts an engine (dummy weights; CUDA graphs captured as when serving), then serves
waves of requests, each of new prompt lengths, batch sizes or sampling options, and reports per
wave its wall time and the variants compiled during it, per kernel. The first waves may compile
what start-up did not (a first prefill, the sampler's options); a later wave of the same kinds
with other lengths that still compiles names a kernel to fix (`do_not_specialize`, a bucketed
constexpr, or a warm-up at start).

    python benchmarks/compile_census.py [--model Qwen2-0.5B] [--out FILE.json]
    python benchmarks/compile_census.py --smoke   # CPU, a tiny Llama: checks the script (no Triton there)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beam_bench import TINY
from engine_bench import MODELS, write_model

from services.common.sampling import SamplingParams
from services.worker.config import WorkerConfig
from services.worker.engine import Engine

GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1}
# (name, prompt lengths, sampling options, max tokens); "again" waves repeat a kind at new lengths
WAVES: list[tuple[str, list[int], dict[str, Any], int]] = [
    ("one greedy prompt of 100", [100], GREEDY, 8),
    ("one greedy prompt of 37", [37], GREEDY, 8),
    ("again: one greedy prompt of 213", [213], GREEDY, 8),
    ("4 greedy prompts of 16 / 33 / 64 / 129", [16, 33, 64, 129], GREEDY, 8),
    ("again: 4 greedy prompts of 9 / 50 / 77 / 300", [9, 50, 77, 300], GREEDY, 8),
    ("8 sampled prompts, top-p / top-k", [5, 17, 31, 48, 64, 90, 111, 160], SAMPLED, 8),
    ("again: 8 sampled prompts at other lengths", [3, 12, 25, 40, 70, 95, 130, 250], SAMPLED, 8),
    ("6 greedy with 5 logprobs", [20, 40, 60, 80, 100, 120], {**GREEDY, "logprobs": 5}, 8),
    ("again: 6 greedy with 5 logprobs", [11, 22, 44, 66, 88, 99], {**GREEDY, "logprobs": 5}, 8),
    ("a long prompt of 1,500 (chunked prefill)", [1500], GREEDY, 4),
    ("again: a long prompt of 1,100", [1100], GREEDY, 4),
    ("32 greedy prompts of mixed lengths", [], GREEDY, 16),  # lengths drawn below
    ("again: 32 greedy prompts of other mixed lengths", [], GREEDY, 16),
]


def triton_kernels() -> dict[str, Any]:
    """Every Triton kernel of the loaded `kernels.*` modules, by qualified name: the jitted
    function (under TRITON_INTERPRET=1 the interpreter's, which compiles nothing), an autotuned or
    heuristics-wrapped kernel by the function it wraps."""
    found: dict[str, Any] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernels.") or module is None:
            continue
        for attr, obj in vars(module).items():
            if not isinstance(obj, KernelInterface):
                continue
            fn = obj
            while not isinstance(fn, JITFunction | InterpretedFunction) and isinstance(
                getattr(fn, "fn", None), KernelInterface
            ):
                fn = fn.fn
            found[f"{name.removeprefix('kernels.')}.{attr}"] = fn
    return found


def compiled_variants() -> Counter[str]:
    """Compiled variants per kernel on the current CUDA device (none on the CPU)."""
    counts: Counter[str] = Counter()
    if not torch.cuda.is_available():
        return counts
    device = torch.cuda.current_device()
    for name, fn in triton_kernels().items():
        if not isinstance(fn, JITFunction):
            continue
        caches = fn.device_caches.get(device)  # (a defaultdict: .get makes no entry)
        if caches is not None:
            counts[name] = len(caches[0])
    return counts


def run_waves(engine: Engine, vocab: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for index, (name, lengths, options, max_tokens) in enumerate(WAVES):
        if not lengths:  # the mixed batch: lengths from 1 to 400
            lengths = [rng.randint(1, 400) for _ in range(32)]
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **options)
        before = compiled_variants()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = engine.generate(prompts, sp, prefix=f"wave{index}")
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert all(r.error is None and len(r.token_ids[0]) == max_tokens for r in results), results[0]
        after = compiled_variants()
        new = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
        rows.append({"wave": name, "prompts": len(prompts), "seconds": seconds, "compiled": new})
        compiled = ", ".join(f"{k} +{v}" for k, v in sorted(new.items())) or "-"
        print(f"{name:<48} {seconds * 1e3:9.1f} ms   compiled: {compiled}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny Llama: checks the script")
    parser.add_argument("--model", default="Qwen2-0.5B", choices=sorted(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="JSON path (default: none written)")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    name = "tiny-llama" if args.smoke else args.model
    cfg: dict[str, Any] = TINY if args.smoke else MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            WorkerConfig(
                model=str(write_model(Path(tmp), name, cfg)),
                load_format="dummy",
                device=device,
                max_num_seqs=32,
                max_model_len=2048,
                max_num_batched_tokens=1024,  # the 1,500-token prompt is prefilled in chunks
            )
        )
        at_start = compiled_variants()
        print(f"{name} on {device}: {sum(at_start.values())} kernel variants compiled at start", flush=True)
        rows = run_waves(engine, int(cfg["vocab_size"]), args.seed)
    later = [r for r in rows if r["wave"].startswith("again") and r["compiled"]]
    print(f"waves of a kind already served that still compiled: {len(later)}")
    if args.out:
        report = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "model": name,
            "at_start": dict(at_start),
            "waves": rows,
            "compiled_again": [r["wave"] for r in later],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
