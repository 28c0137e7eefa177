"""One scenario-2 shape on Llama-3.1-8B dummy weights under each of several environment variants,
each in a fresh process (the switches are read at import), for A/B comparisons of scheduling and
kernel options:

    python benchmarks/offline_ab.py --shape 1024,128,512 --variants "base:,nopdl:TANDEM_PDL=0"

Prints one line per variant (output tok/s and the step breakdown of engine_bench's StepTimer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(shape: tuple[int, int, int], budget: int) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from engine_bench import FULL, MODELS, make_engine, scenario_offline, write_model

    cfg = MODELS["Llama-3.1-8B"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), "Llama-3.1-8B", cfg)
        engine = make_engine(
            model_dir,
            "cuda",
            FULL,
            FULL.max_num_seqs,
            FULL.llama_max_model_len,
            max_num_batched_tokens=budget,
        )
        gen = torch.Generator().manual_seed(0)
        (row,) = scenario_offline(engine, "Llama-3.1-8B", cfg, FULL, gen, (shape,))
        print("RESULT " + json.dumps(row.metrics), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,128,512", help="input,output,requests")
    parser.add_argument("--budget", type=int, default=8192, help="--max-num-batched-tokens")
    parser.add_argument(
        "--variants", default="base:", help='"name:ENV=V,ENV2=V;..." comma-separated per name'
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    assert len(shape) == 3
    if args.child:
        run_one(shape, args.budget)  # type: ignore[arg-type]
        return 0
    for spec in args.variants.split(";"):
        name, _, assignments = spec.partition(":")
        env = dict(os.environ)
        for pair in filter(None, assignments.split(",")):
            key, _, value = pair.partition("=")
            env[key] = value
        cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--budget", str(args.budget)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        m = json.loads(lines[-1][len("RESULT ") :])
        print(
            f"{name:<12} {m['out_tok_per_s']:8.0f} out tok/s  {m['seconds']:6.2f} s  "
            f"prefill {m['prefill_steps']:.0f} x {m['prefill_ms_per_step']:.0f} ms (device {m.get('prefill_device_s', 0):.2f} s)  "
            f"decode {m['decode_steps']:.0f} x {m['decode_ms_per_step']:.1f} ms (device {m.get('decode_device_s', 0):.2f} s)  "
            f"idle {m.get('device_idle_s', 0):.2f} s  overlapped {m['overlapped_steps']:.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
