"""Where the device time of a serving-sized engine step goes: torch.profiler kernel tables of one
prefill step (8 prompts of 1,024 tokens, an 8,192-token budget), of decode steps at batch 192
(contexts ~1,100) and of the mixed steps when 8 prompts join them, and one layer's attention of
such a mixed step with and without the decode kernel for its decode rows; Llama-3.1-8B shapes on
dummy weights (the offline scenario 2 of engine_bench).

    python benchmarks/step_profile.py [--model Llama-3.1-8B] [--out benchmarks/results/step_profile_<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import FULL, MODELS, kernel_totals, make_engine, random_prompt, write_model

from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams

DECODE_BATCH = 192  # leaves room (--max-num-seqs 256) for the mixed step's 8 new prompts


def kernel_table(prof: profile, steps: int, top: int = 24) -> tuple[float, list[dict[str, float | str]]]:
    """(device-busy us per step, the top kernels by time per step)."""
    totals = kernel_totals(prof, 70)
    busy = sum(v[1] for v in totals.values()) / steps
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return busy, [
        {"kernel": k, "calls_per_step": c / steps, "us_per_call": us / c, "us_per_step": us / steps}
        for k, (c, us) in rows
    ]


def profiled_steps(engine: Engine, steps: int) -> tuple[float, profile]:
    """Wall seconds per step over `steps` engine steps, and their profile."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
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
    q = torch.randn(sum(q_lens), cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    args = (q, cache, tables.to(dev), cu, seq_lens, cfg.head_dim**-0.5, plen)
    attend = engine.ops.paged_attention
    out = {}
    for label, k in (("prefill_kernel_only_us", 0), ("decode_plus_prefill_us", decodes)):
        for _ in range(3):
            attend(*args, num_decode_rows=k)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            attend(*args, num_decode_rows=k)
        torch.cuda.synchronize()
        out[label] = (time.perf_counter() - t0) / 20 * 1e6
    print(f"\nmixed-step attention, one layer ({decodes} decodes + {prompts} x {plen}): {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Llama-3.1-8B")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cfg = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.model, cfg)
        engine = make_engine(model_dir, "cuda", FULL, FULL.max_num_seqs, FULL.llama_max_model_len)
        vocab = cfg["vocab_size"]
        once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for rep in range(2):  # warm-up, then the profiled prefill step
            for i in range(8):
                engine.add_request(EngineRequest(f"p{rep}-{i}", tuple(random_prompt(gen, 1024, vocab)), once))
            if rep == 0:
                while engine.has_unfinished():
                    engine.step()
        wall, prof = profiled_steps(engine, 1)
        while engine.has_unfinished():
            engine.step()
        busy, rows = kernel_table(prof, 1)
        print_table("prefill step, 8 x 1024 tokens", wall, busy, rows)
        report["prefill"] = {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "kernels": rows}

        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        for i in range(DECODE_BATCH):
            engine.add_request(EngineRequest(f"d{i}", tuple(random_prompt(gen, 1024, vocab)), params))
        while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) or (
            engine.scheduler.waiting
        ):
            engine.step()
        for _ in range(20):  # into steady decode
            engine.step()
        wall, prof = profiled_steps(engine, 10)
        busy, rows = kernel_table(prof, 10)
        print_table(f"decode steps, batch {len(engine.scheduler.running)}, context ~1,100", wall, busy, rows)
        report["decode"] = {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "kernels": rows}
        # Mixed steps: the running decodes plus 8 new 1,024-token prompts (one budget of 8,192).
        for i in range(8):
            engine.add_request(EngineRequest(f"m{i}", tuple(random_prompt(gen, 1024, vocab)), params))
        wall, prof = profiled_steps(engine, 3)
        busy, rows = kernel_table(prof, 3)
        print_table(f"3 steps after adding 8 x 1024 prompts to {DECODE_BATCH} decodes", wall, busy, rows)
        report["mixed"] = {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "kernels": rows}
        report["mixed_attention"] = mixed_attention_ab(engine)
        for rid in list(engine.requests):
            engine.abort(rid)
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    out = args.out or f"benchmarks/results/step_profile_{name}.json"
    Path(out).write_text(json.dumps(report, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
