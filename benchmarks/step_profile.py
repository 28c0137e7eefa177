"""Where the device time of a serving-sized engine step goes: torch.profiler kernel tables of one
prefill step (8 prompts of 1,024 tokens, an 8,192-token budget), of decode steps at batch 192
(contexts ~1,100) and of the mixed steps when 8 prompts join them, and one layer's attention of
such a mixed step with and without the decode kernel for its decode rows; Llama-3.1-8B shapes on
dummy weights (the offline scenario 2 of engine_bench).

    python benchmarks/step_profile.py [--model Llama-3.1-8B] [--out benchmarks/results/step_profile_<gpu>.json]

The weights' and the KV cache's formats and the decode batch are options: the decode steps of
engine_bench's offline 128/2048 run with fp8 weights and an fp8 KV cache (256 sequences, contexts
~1,100 on average) are

    python benchmarks/step_profile.py --quantization fp8 --kv-cache-dtype fp8 --decode-batch 256 --decode-only

(`--decode-only`: no prefill or mixed table; a decode batch of more than 248 leaves no room for the
mixed step's 8 prompts, which is then left out.) `--smoke` runs the same steps on the CPU with a
tiny Llama (its tables list CPU ops): a check of the script, no figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import FULL, MODELS, kernel_totals, make_engine, random_prompt, tiny, write_model

from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams

DECODE_BATCH = 192  # leaves room (--max-num-seqs 256) for the mixed step's 8 new prompts


def kernel_table(prof: profile, steps: int, top: int = 24) -> tuple[float, list[dict[str, float | str]]]:
    """(device-busy us per step, the top kernels by time per step); on the CPU (--smoke), ops."""
    totals = kernel_totals(prof, 70) if torch.cuda.is_available() else cpu_op_totals(prof, 70)
    busy = sum(v[1] for v in totals.values()) / steps
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return busy, [
        {"kernel": k, "calls_per_step": c / steps, "us_per_call": us / c, "us_per_step": us / steps}
        for k, (c, us) in rows
    ]


def cpu_op_totals(prof: profile, name_len: int) -> dict[str, list[float]]:
    """[calls, CPU us] per op name of a CPU-only torch.profiler run (--smoke)."""
    totals: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        totals[ev.key[:name_len]] = [float(ev.count), float(ev.self_cpu_time_total)]
    return totals


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled_steps(engine: Engine, steps: int) -> tuple[float, profile]:
    """Wall seconds per step over `steps` engine steps, and their profile."""
    synchronize()
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize()
        wall = (time.perf_counter() - t0) / steps
    return wall, prof


def print_table(title: str, wall: float, busy: float, rows: list[dict[str, float | str]]) -> None:
    print(f"\n{title}: wall {wall * 1e3:.2f} ms/step, kernels busy {busy / 1e3:.2f} ms/step")
    for r in rows:
        print(
            f"  {r['kernel']:<70} {float(r['calls_per_step']):6.0f}/step {float(r['us_per_call']):9.1f} us"
            f" {float(r['us_per_step']) / 1e3:8.2f} ms/step"
        )


def mixed_attention_ab(engine: Engine) -> dict[str, float]:
    """One layer's attention of a mixed step (the running decodes, contexts ~1,100, then 8 prompts of
    1,024 new tokens), Llama-3.1-8B heads: the prefill kernel over all of it, or the decode kernel
    over the decodes and the prefill kernel over the prompts (`num_decode_rows`)."""
    cfg = engine.model_config
    bs = engine.config.block_size
    decodes, prompts, ctx, plen = DECODE_BATCH, 8, 1100, 1024
    lens = [ctx] * decodes + [plen] * prompts
    q_lens = [1] * decodes + [plen] * prompts
    blocks = [-(-n // bs) for n in lens]
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.arange(start, start + n, dtype=torch.int32)
        start += n
    dev, dtype = engine.device, engine.dtype
    cache = torch.randn(2, start, bs, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=dtype)
    if engine.kv_cache is not None and engine.kv_cache.tensor.dtype != dtype:  # (an fp8 cache)
        cache = cache.to(engine.kv_cache.tensor.dtype)
    q = torch.randn(sum(q_lens), cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    args = (q, cache, tables.to(dev), cu, seq_lens, cfg.head_dim**-0.5, plen)
    attend = engine.ops.paged_attention
    out = {}
    for label, k in (("prefill_kernel_only_us", 0), ("decode_plus_prefill_us", decodes)):
        for _ in range(3):
            attend(*args, num_decode_rows=k)
        synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            attend(*args, num_decode_rows=k)
        synchronize()
        out[label] = (time.perf_counter() - t0) / 20 * 1e6
    print(f"\nmixed-step attention, one layer ({decodes} decodes + {prompts} x {plen}): {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Llama-3.1-8B")
    parser.add_argument("--quantization", default="none", help="the weights: none (bf16), int8, fp8, ...")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    parser.add_argument("--decode-batch", type=int, default=DECODE_BATCH, help="decode steps' sequences")
    parser.add_argument("--decode-only", action="store_true", help="the decode table alone")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny Llama: checks the script")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    cfg = tiny(MODELS[args.model]) if args.smoke else MODELS[args.model]
    device = "cpu" if args.smoke else "cuda"
    # --smoke: the same steps at toy sizes (prompt, decode batch, prefill prompts, steps)
    plen, batch, prompts = (16, 4, 2) if args.smoke else (1024, args.decode_batch, 8)
    max_seqs = max(FULL.max_num_seqs, batch)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report: dict[str, object] = {
        "gpu": gpu,
        "model": args.model,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "decode_batch": batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.model, cfg)
        engine = make_engine(
            model_dir,
            device,
            FULL,
            max_seqs,
            plen + 512 if args.smoke else FULL.llama_max_model_len,
            kv_cache_dtype=args.kv_cache_dtype,
            quantization=args.quantization,
        )
        vocab = cfg["vocab_size"]
        assert engine.kv_cache is not None
        # what the engine made of the options (the cache's element type, the weights' bytes)
        report["kv_cache_tensor_dtype"] = str(engine.kv_cache.tensor.dtype)
        report["weight_bytes"] = engine.weight_bytes
        if not args.decode_only:
            once: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            for rep in range(2):  # warm-up, then the profiled prefill step
                for i in range(prompts):
                    engine.add_request(
                        EngineRequest(f"p{rep}-{i}", tuple(random_prompt(gen, plen, vocab)), once)
                    )
                if rep == 0:
                    while engine.has_unfinished():
                        engine.step()
            wall, prof = profiled_steps(engine, 1)
            while engine.has_unfinished():
                engine.step()
            busy, rows = kernel_table(prof, 1)
            print_table(f"prefill step, {prompts} x {plen} tokens", wall, busy, rows)
            report["prefill"] = {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "kernels": rows}

        params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        for i in range(batch):
            engine.add_request(EngineRequest(f"d{i}", tuple(random_prompt(gen, plen, vocab)), params))
        while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) or (
            engine.scheduler.waiting
        ):
            engine.step()
        for _ in range(20):  # into steady decode
            engine.step()
        running = len(engine.scheduler.running)
        wall, prof = profiled_steps(engine, 10)
        busy, rows = kernel_table(prof, 10)
        print_table(f"decode steps, batch {running}, context ~{plen + 25}", wall, busy, rows)
        report["decode"] = {
            "batch": running,
            "wall_ms": wall * 1e3,
            "busy_ms": busy / 1e3,
            "tokens_per_s": running / wall,
            "kernels": rows,
        }
        if not args.decode_only and batch + prompts <= max_seqs:
            # Mixed steps: the running decodes plus 8 new 1,024-token prompts (one budget of 8,192).
            for i in range(prompts):
                engine.add_request(EngineRequest(f"m{i}", tuple(random_prompt(gen, plen, vocab)), params))
            wall, prof = profiled_steps(engine, 3)
            busy, rows = kernel_table(prof, 3)
            print_table(
                f"3 steps after adding {prompts} x {plen} prompts to {batch} decodes", wall, busy, rows
            )
            report["mixed"] = {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "kernels": rows}
            if not args.smoke:
                report["mixed_attention"] = mixed_attention_ab(engine)
        for rid in list(engine.requests):
            engine.abort(rid)
    name = gpu.lower().replace(" ", "-")
    results = Path(tempfile.gettempdir()) if args.smoke else Path(__file__).parent / "results"
    out = Path(args.out or results / f"step_profile_{name}.json")
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
