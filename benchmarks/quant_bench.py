"""Quantized weights, batch-1 decode: bf16 against int8 / fp8 / int4 (W4A16) in one run.

    python benchmarks/quant_bench.py            # GPU: Llama-3.1-8B shape, every format, one device call
    python benchmarks/quant_bench.py --smoke    # CPU, tiny shapes: checks the script in seconds

Each format is a fresh engine on dummy weights of the same shape, quantized at load time
(`--quantization`, services/worker/layers/quantization/), with CUDA graphs as served. Rows:
- decode: median step time of one sequence (prompt 128, output --output tokens), tokens/s, the
  speed-up over the bf16 row of the same run, and MBU against the bytes a step reads in that
  format: the weights as stored (`Engine.weight_bytes`: quantized projections at their size plus
  scales, the LM head in bf16; an untied input embedding left out: a step reads one row of it)
  plus the KV of the mean context, over the device-to-device copy bandwidth measured in the run;
- gemm: one projection shape of the model at M = 1 and 16 (decode) and 512 (prefill), the
  format's GEMM (`KernelOps.quant_linear` Triton kernel, fp8 `torch._scaled_mm`) against bf16
  F.linear on the same device, time per call and weight GB/s.
The JSON goes to benchmarks/results/quant_<gpu>_<date>.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from engine_bench import (  # noqa: E402
    FULL,
    MODELS,
    SMOKE,
    free_engine,
    measure_ceilings,
    median_time,
    param_counts,
    random_prompt,
    step_until_done,
    tiny,
    write_model,
)

from benchmarks.bench_report import device_label, write_report  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from services.worker.request import EngineRequest, SamplingParams  # noqa: E402

FORMATS = ("none", "int8", "fp8", "int4")


def decode_row(
    model_dir: Path,
    cfg: dict[str, Any],
    quantization: str,
    args: argparse.Namespace,
    copy_gbps: float,
    device: str,
) -> dict[str, Any]:
    engine = Engine(
        WorkerConfig(
            model=str(model_dir),
            load_format="dummy",
            device=device,
            max_num_seqs=8,
            max_model_len=args.prompt + args.output + 16,
            enable_prefix_caching=False,
            quantization=quantization,  # type: ignore[arg-type]
            # int4: group 128 (the AWQ / GPTQ shape); the smoke shapes' hidden size is 64
            quantization_group_size=32 if quantization == "int4" and cfg["hidden_size"] % 128 else 0,
        )
    )
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    prompt = tuple(random_prompt(gen, args.prompt, cfg["vocab_size"]))
    step_times = step_until_done(engine, [EngineRequest("d", prompt, params)])
    tpot = statistics.median(step_times[1:])
    p = param_counts(cfg)
    untied_embed = 0 if cfg["tie_word_embeddings"] else p["embed"] * 2
    kv = (
        (args.prompt + args.output // 2)
        * cfg["num_hidden_layers"]
        * 2
        * cfg["num_key_value_heads"]
        * p["head_dim"]
        * 2
    )
    step_bytes = engine.weight_bytes - untied_embed + kv
    row = {
        "format": quantization if quantization != "none" else "bf16",
        "weight_GB": engine.weight_bytes / 1e9,
        "bytes_per_step_GB": step_bytes / 1e9,
        "ms_per_token": tpot * 1e3,
        "tok_per_s": 1 / tpot,
        "MBU": step_bytes / tpot / (copy_gbps * 1e9),
        "kv_blocks": engine.kv_cache.num_blocks,
    }
    free_engine(engine)
    return row


def gemm_rows(cfg: dict[str, Any], device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    """The gate/up projection shape: every format's GEMM against bf16 F.linear."""
    from kernels import get_ops
    from services.worker.layers.quantization.fp8 import device_has_fp8, quantize_fp8, scaled_mm_fp8
    from services.worker.layers.quantization.int4 import quantize_int4
    from services.worker.layers.quantization.int8 import quantize_int8

    ops = get_ops("auto", device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, k = 2 * cfg["intermediate_size"], cfg["hidden_size"]
    w = torch.randn(n, k, device=device) * 0.02
    q8, s8 = quantize_int8(w, 0)
    q4, s4 = quantize_int4(w, 128 if k % 128 == 0 else k)
    f8, sf8 = quantize_fp8(w)
    wb = w.to(dtype)
    rows = []
    for m in (1, 16) if smoke else (1, 16, 512):
        x = torch.randn(m, k, device=device, dtype=dtype)
        cases: dict[str, tuple[Any, int]] = {
            "bf16 F.linear": (lambda x=x: F.linear(x, wb), wb.numel() * wb.element_size()),
            "int8": (lambda x=x: ops.quant_linear(x, q8, s8, 8), q8.numel() + s8.numel() * 4),
            "int4 g128": (lambda x=x: ops.quant_linear(x, q4, s4, 4), q4.numel() + s4.numel() * 4),
        }
        if device_has_fp8(device):
            cases["fp8 _scaled_mm W8A8"] = (lambda x=x: scaled_mm_fp8(x, f8, sf8, None), f8.numel() + n * 4)
        for name, (fn, nbytes) in cases.items():
            t = median_time(fn, device, warmup=3, iters=20)
            rows.append(
                {
                    "shape": f"M={m} N={n} K={k}",
                    "kernel": name,
                    "us": t * 1e6,
                    "weight_GBps": nbytes / t / 1e9,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script in seconds")
    parser.add_argument("--model", default="Llama-3.1-8B", choices=list(MODELS))
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated subset of " + ", ".join(FORMATS)
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/quant_<gpu>_<date>.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt, args.output = 8, 6
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    device_name = device_label(device)
    torch.manual_seed(0)
    ceil = measure_ceilings(device, SMOKE if args.smoke else FULL)
    print(f"ceilings: copy {ceil.copy_gbps:.0f} GB/s, matmul {ceil.matmul_tflops:.1f} TFLOP/s", flush=True)
    cfg = tiny(MODELS[args.model]) if args.smoke else MODELS[args.model]
    decode: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.model, cfg)
        for quantization in args.formats.split(","):
            row = decode_row(model_dir, cfg, quantization, args, ceil.copy_gbps, device.type)
            decode.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in decode if r["format"] == "bf16"), None)
    for r in decode:
        r["speedup_vs_bf16"] = r["tok_per_s"] / base["tok_per_s"] if base else float("nan")
    gemm = gemm_rows(cfg, device, args.smoke)
    print(f"\n{device_name}: {args.model} batch-1 decode, prompt {args.prompt}, output {args.output}")
    for r in decode:
        print(
            f"  {r['format']:<6} {r['tok_per_s']:8.1f} tok/s  x{r['speedup_vs_bf16']:.2f}  "
            f"MBU {r['MBU']:.2f} of {r['bytes_per_step_GB']:.2f} GB/step  weights {r['weight_GB']:.2f} GB  "
            f"KV blocks {r['kv_blocks']}"
        )
    for g in gemm:
        print(f"  {g['shape']:<22} {g['kernel']:<22} {g['us']:9.1f} us  {g['weight_GBps']:7.0f} GB/s")
    out = write_report(
        "quant",
        device_name,
        args.smoke,
        args.out,
        {
            "model": args.model,
            "ceilings": {"copy_GBps": ceil.copy_gbps, "bf16_matmul_TFLOPs": ceil.matmul_tflops},
            "decode": decode,
            "gemm": gemm,
        },
    )
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / out.name).write_text(out.read_text())
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
