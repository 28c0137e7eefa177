"""Where a beam step's time goes against a sampling step's, by op (torch.profiler).

Runs the beam_bench workload (8 prompts of 128 tokens, dummy weights) once per mode for width W
with the profiler on over the steady steps, and prints per mode: steps, host (CPU) time per
step, device time per step, kernel launches per step, and the ops with the most device time.
With steps launched ahead a step costs max(device, host): the row that grew is the one to cut.

    python benchmarks/beam_profile.py --model Qwen2-0.5B --width 4      # GPU
    python benchmarks/beam_profile.py --smoke                           # CPU, a tiny Llama
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beam_bench import TINY, asdict_sp, count_steps
from engine_bench import MODELS, write_model

from services.common.sampling import SamplingParams
from services.worker.config import WorkerConfig
from services.worker.engine import Engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny Llama")
    parser.add_argument("--model", default="Qwen2-0.5B")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=15, help="ops listed per mode")
    parser.add_argument(
        "--sort",
        choices=["device", "host"],
        default="device",
        help="list the ops with the most device time (default on CUDA) or the most host time",
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    name, cfg = ("tiny-llama", TINY) if args.smoke else (args.model, MODELS[args.model])
    if args.smoke:
        args.prompts, args.prompt_len, args.max_tokens = 2, 12, 8
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            WorkerConfig(
                model=str(write_model(Path(tmp), name, cfg)),
                load_format="dummy",
                device=device,
                max_num_seqs=args.width * args.prompts,
                max_model_len=args.prompt_len + args.max_tokens + 8,
                enable_prefix_caching=False,
                async_scheduling="on",  # (the CPU's default is off): beam steps launched ahead
            )
        )
        gen = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size
        prompts = [
            torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)
        ]
        common: dict[str, Any] = {"max_tokens": args.max_tokens, "ignore_eos": True}
        modes = {
            "beam": SamplingParams(temperature=0.0, n=args.width, use_beam_search=True, **common),
            "sample": SamplingParams(temperature=1.0, n=args.width, seed=1, **common),
        }
        for mode, sp in modes.items():
            engine.generate(prompts[:1], SamplingParams(**{**asdict_sp(sp), "max_tokens": 4}))  # warm-up
            steps = count_steps(engine)
            with profile(activities=activities) as prof:
                engine.generate(prompts, sp)
            if device == "cuda":
                torch.cuda.synchronize()
            n = max(steps(), 1)
            del engine.step
            events = prof.key_averages()
            host = sum(e.self_cpu_time_total for e in events) / n
            dev = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / n
            launches = (
                sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / n
            )
            copies = sum(e.count for e in events if e.key.startswith("cudaMemcpyAsync")) / n
            print(f"\n== {name} W={args.width} {mode}: {n} steps on {device} ==")
            print(
                f"per step: host {host:.0f} us (profiler's CPU op time), device {dev:.0f} us,"
                f" {launches:.1f} kernel launches, {copies:.1f} memcpys"
            )
            on_device = device == "cuda" and args.sort == "device"
            sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
            print(events.table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
