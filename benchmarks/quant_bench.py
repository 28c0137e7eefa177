"""Quantized weights, batch-1 decode: bf16 against int8 / fp8 / int4 (W4A16) in one run.

    python benchmarks/quant_bench.py            # GPU: Llama-3.1-8B shape, every format, one device call
    python benchmarks/quant_bench.py --smoke    # CPU, tiny shapes: checks the script in seconds
    python benchmarks/quant_bench.py --gemv-only   # GPU: only the decode GEMVs, every candidate config

Each format is a fresh engine on dummy weights of the same shape, quantized at load time
(`--quantization`, services/worker/layers/quantization/), with CUDA graphs as served. Rows:
- decode: median step time of one sequence (prompt 128, output --output tokens), tokens/s, the
  speed-up over the bf16 row of the same run, and MBU against the bytes a step reads in that
  format: the weights as stored (`Engine.weight_bytes`: quantized projections at their size plus
  scales, the LM head in bf16; an untied input embedding left out: a step reads one row of it)
  plus the KV of the mean context, over the device-to-device copy bandwidth measured in the run;
- gemm: the decode step's gate/up GEMM of each format fused as the folded path runs it (norm
  weight, 1/rms and SiLU-and-mul in one launch, tuned as the engine tunes it) against the
  launches it replaces (RMSNorm + GEMM + SiLU-and-mul), M = 1 and 4; then
  one projection shape of the model at M = 1 and 16 (decode) and 1024 (prefill), the
  format's GEMM (`KernelOps.quant_linear` Triton kernel; fp8 W8A8 both ways: `torch._scaled_mm`
  and the Triton FP8 GEMM) against bf16 F.linear on the same device, time per call and weight
  GB/s. The shape is first tuned as the engine tunes it (`tune_fp8_linear` and, for int8 / int4,
  `tune_quant_linear`: their report lines in `fp8_tuning`; each int row names the config it ran), and the row "fp8 W8A8 chosen" runs what the engine would run; its
  `fp8_choice` column names the choice (`_scaled_mm` or the Triton config). The fp8 engine's own
  choices for every projection shape are in `fp8_engine_choices`.
The JSON goes to benchmarks/results/quant_<gpu>_<date>.json (and $OUT when set).

`--gemv-only` (one short device call, no engine): the M = 1 and M = 4 GEMVs of the model's four
projection shapes (qkv, o, gate/up, down) for int8 (per channel), int4 (W4A16, group 128) and
FP8 weight-only, each candidate config of the quantized GEMM's tuner (`quant_gemm.candidates`: the
gemv / dot configs and the word GEMV's `words` configs of quant_gemv.py) checked against the twin
and timed as the tuner times them (CUDA graph replays, L2 flushed before each call), with bf16
F.linear timed the same way as the baseline; per row us, GB/s of the quantized bytes (codes and
scales) and the speed-up over bf16; per shape and format the best config of each kind. On the CPU
(`--smoke --gemv-only` under TRITON_INTERPRET=1) tiny shapes and eager timing check the script.
`--gemv-only --wide` (one row) times a wider grid of the word GEMV's configs than the tuner's (and
the tuner's word configs), e.g. `--gemv-only --wide --formats fp8,int4`.
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
    params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
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
    fp8_lines = [line for line in engine.runner.linear_report if line.startswith("fp8 ")]
    quant_lines = [line for line in engine.runner.linear_report if line.startswith("quant ")]
    row = {
        "format": quantization if quantization != "none" else "bf16",
        "weight_GB": engine.weight_bytes / 1e9,
        "bytes_per_step_GB": step_bytes / 1e9,
        "ms_per_token": tpot * 1e3,
        "tok_per_s": 1 / tpot,
        "MBU": step_bytes / tpot / (copy_gbps * 1e9),
        "kv_blocks": engine.kv_cache.num_blocks,
        # the decode step's norms folded (into the weights for bf16, into the quantized GEMMs
        # otherwise: norm weight, 1/rms, SiLU-and-mul and residual adds fused; TANDEM_FOLD_NORMS=0: off)
        "norms_folded": engine.runner.model.norms_folded,
    }
    if fp8_lines:
        row["fp8_engine_choices"] = fp8_lines
    if quant_lines:
        row["quant_engine_choices"] = quant_lines
    free_engine(engine)
    return row


def graph_time(fn: Any, device: torch.device, calls: int = 10) -> float:
    """Device seconds per call of fn(), as a decode step runs it: on CUDA, replays of a CUDA graph of
    `calls` calls (no host launch time: an eager call of a Triton GEMM can spend longer on the host
    than a 28672 x 4096 weight stream takes, so round 13's eager per-GEMM rows were launch-bound);
    elsewhere the eager median."""
    if device.type != "cuda":
        return median_time(fn, device, warmup=3, iters=20)
    from kernels.triton.skinny_gemm import _graph_seconds

    return _graph_seconds(lambda i: fn(), calls) / calls


def gemm_rows(
    cfg: dict[str, Any], device: torch.device, smoke: bool, fp8_tuning: list[str]
) -> list[dict[str, Any]]:
    """The gate/up projection shape: every format's GEMM against bf16 F.linear (fp8's tuner
    report lines are appended to fp8_tuning)."""
    from kernels import get_ops, reference
    from kernels.triton import fp8_gemm, quant_gemm
    from services.worker.layers.quantization.fp8 import quantize_fp8, runs_w8a8
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
    f8_rows = (1, 16) if smoke else (1, 16, 1024)  # (buckets of fp8_gemm.ROW_BUCKETS)
    w8a8 = runs_w8a8(f8, device, dtype)
    if w8a8:
        fp8_tuning += fp8_gemm.tune_fp8_linear([f8], [sf8], None, "gate_up_proj", rows=f8_rows)
    if device.type == "cuda":  # as the engine tunes its integer-weight projections
        fp8_tuning += quant_gemm.tune_quant_linear([q8], [s8], None, 8, None, "gate_up_proj", rows=f8_rows)
        fp8_tuning += quant_gemm.tune_quant_linear([q4], [s4], None, 4, None, "gate_up_proj", rows=f8_rows)
    rows = []
    rows = fused_rows(ops, device, dtype, n, k, [(q8, s8, 8), (q4, s4, 4), (f8, sf8, 8)], smoke, fp8_tuning)
    for m in f8_rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        cases: dict[str, tuple[Any, int]] = {
            "bf16 F.linear": (lambda x=x: F.linear(x, wb), wb.numel() * wb.element_size()),
            f"int8 {quant_gemm.chosen(x, q8, s8, 8, False, False)}": (
                lambda x=x: ops.quant_linear(x, q8, s8, 8),
                q8.numel() + s8.numel() * 4,
            ),
            f"int4 g128 {quant_gemm.chosen(x, q4, s4, 4, False, False)}": (
                lambda x=x: ops.quant_linear(x, q4, s4, 4),
                q4.numel() + s4.numel() * 4,
            ),
        }
        fp8_bytes = f8.numel() + n * 4
        choice = str(fp8_gemm.chosen(n, k, False, m) or "_scaled_mm") if w8a8 else ""
        if w8a8:
            cases["fp8 W8A8 _scaled_mm"] = (lambda x=x: fp8_gemm.scaled_mm_w8a8(x, f8, sf8, None), fp8_bytes)
            best = fp8_gemm.chosen(n, k, False, m)
            if not isinstance(best, fp8_gemm.Fp8Config):  # (the weight-only GEMM: the "chosen" row)
                best = fp8_gemm.candidates(m)[0]
            cases[f"fp8 W8A8 {best}"] = (
                lambda x=x, c=best: fp8_gemm.fp8_gemm(x, f8, sf8, None, c),
                fp8_bytes,
            )
            cases["fp8 W8A8 chosen"] = (lambda x=x: fp8_gemm.w8a8_linear(x, f8, sf8, None), fp8_bytes)
        else:  # weight-only FP8 (no FP8 tensor cores, or the CPU smoke run)
            cases["fp8 weight-only"] = (lambda x=x: reference.fp8_linear(x, f8, sf8), fp8_bytes)
        for name, (fn, nbytes) in cases.items():
            t = graph_time(fn, device)
            row = {
                "shape": f"M={m} N={n} K={k}",
                "kernel": name,
                "us": t * 1e6,
                "weight_GBps": nbytes / t / 1e9,
            }
            if name.startswith("fp8"):
                row["fp8_choice"] = choice or "weight-only"
            rows.append(row)
    return rows


def fused_rows(
    ops: Any,
    device: torch.device,
    dtype: torch.dtype,
    n: int,
    k: int,
    formats: list[tuple[torch.Tensor, torch.Tensor, int]],  # (qweight, scales, bits)
    smoke: bool,
    tuning: list[str],  # the tuner's report lines are appended here
) -> list[dict[str, Any]]:
    """The decode step's gate/up projection of the raw residual stream, per weight format at M = 1
    and 4: the folded path's one fused launch (`quant_linear_fused`: norm weight, 1/rms and
    SiLU-and-mul inside the quantized GEMM, tuned as the engine tunes it) against the unfused
    launches it replaces (RMSNorm, the quantized GEMM, SiLU-and-mul)."""
    from kernels.ops import QuantFusion
    from kernels.triton import quant_gemm

    gated = QuantFusion(norm=True, rms=True, gated=True)
    g = (1.0 + 0.1 * torch.randn(k, device=device)).to(dtype)
    eps = 1e-5
    rows = []
    for q, s, bits in formats:
        label = "fp8 weight-only" if q.dtype == torch.float8_e4m3fn else f"int{bits}"
        if device.type == "cuda":
            tuning += quant_gemm.tune_quant_linear([q], [s], None, bits, None, "gate_up_proj", fusion=gated)
        for m in (1,) if smoke else (1, 4):
            x = torch.randn(m, k, device=device, dtype=dtype)
            nbytes = q.numel() * q.element_size() + s.numel() * 4

            def unfused(x: torch.Tensor = x, q: Any = q, s: Any = s, bits: int = bits) -> torch.Tensor:
                return ops.silu_and_mul(ops.quant_linear(ops.rms_norm(x, g, eps), q, s, bits))

            def fused(x: torch.Tensor = x, q: Any = q, s: Any = s, bits: int = bits) -> torch.Tensor:
                return ops.quant_linear_fused(x, q, s, bits, None, None, g, eps, True)

            config = quant_gemm.chosen_fused(x, q, s, bits, False, False, gated)
            names = (f"folded {label}: norm + GEMM + SiLU", f"folded {label}: fused {config}")
            for name, fn in zip(names, (unfused, fused), strict=True):
                t = graph_time(fn, device)
                rows.append(
                    {
                        "shape": f"M={m} N={n} K={k}",
                        "kernel": name,
                        "us": t * 1e6,
                        "weight_GBps": nbytes / t / 1e9,
                    }
                )
    return rows


def projection_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(N, K) of the decode step's four projections of a dense model (fused qkv and gate/up)."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    return {
        "qkv_proj": ((heads + 2 * kv) * d, h),
        "o_proj": (h, heads * d),
        "gate_up_proj": (2 * cfg["intermediate_size"], h),
        "down_proj": (h, cfg["intermediate_size"]),
    }


def gemv_rows(
    cfg: dict[str, Any],
    device: torch.device,
    rows: tuple[int, ...],
    smoke: bool = False,
    shapes_wanted: list[str] | None = None,
    progress: Any = None,  # called with the rows so far after each shape (a timed-out call keeps them)
    wide: bool = False,
    formats_wanted: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate config of each format on each projection shape at each row count, and bf16
    F.linear (see the module docstring, `--gemv-only`). smoke: one shape, the first config of each
    kind (the interpreter takes seconds a call). wide: the word GEMV's configs of `wide_words`
    instead of the tuner's candidates. formats_wanted: a subset of int8, int4, fp8."""
    from kernels import reference
    from kernels.triton import quant_gemm
    from services.worker.layers.quantization.fp8 import quantize_fp8
    from services.worker.layers.quantization.int4 import quantize_int4
    from services.worker.layers.quantization.int8 import quantize_int8

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        from kernels.triton.skinny_gemm import _graph_seconds, _time_calls, l2_flush

        flush = l2_flush(device)
        flush_s = _graph_seconds(lambda i: flush(), 10) / 10

    def timed(fn: Any) -> float:
        if cuda:
            return _time_calls(lambda _w: fn(), [torch.empty(0)], flush, flush_s, 20)
        return median_time(fn, device, warmup=1, iters=3)

    out: list[dict[str, Any]] = []
    shapes = projection_shapes(cfg)
    if smoke:
        shapes = {"o_proj": shapes["o_proj"]}
    elif shapes_wanted:
        shapes = {name: shapes[name] for name in shapes_wanted}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device) * 0.02
        wb = w.to(dtype)
        q8, s8 = quantize_int8(w, 0)
        q4, s4 = quantize_int4(w, 128 if k % 128 == 0 else k)
        f8, sf8 = quantize_fp8(w)
        formats = [("int8", q8, s8, 8), ("int4 g128", q4, s4, 4), ("fp8 weight-only", f8, sf8, 8)]
        if formats_wanted:
            formats = [f for f in formats if f[0].split()[0] in formats_wanted]
        del w
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            shape = f"{name} M={m} N={n} K={k}"
            t_bf16 = timed(lambda x=x, wb=wb: F.linear(x, wb))
            out.append(
                {
                    "shape": shape,
                    "format": "bf16",
                    "kernel": "F.linear",
                    "us": t_bf16 * 1e6,
                    "GBps": wb.numel() * 2 / t_bf16 / 1e9,
                    "vs_bf16": 1.0,
                }
            )
            for label, q, s, bits in formats:
                nbytes = q.numel() * q.element_size() + s.numel() * 4
                if q.dtype == torch.float8_e4m3fn:
                    ref = reference.fp8_linear(x.float(), q, s).double()
                else:
                    ref = reference.quant_linear(x.float(), q, s, bits).double()
                configs = quant_gemm.candidates(m, bits)
                if wide:
                    configs = tuple(dict.fromkeys(wide_words(m, bits) + tuple(c for c in configs if c.words)))
                if smoke and wide:
                    configs = configs[:1]
                elif smoke:
                    configs = tuple(
                        dict.fromkeys(next(c for c in configs if c.words == w) for w in (False, True))
                    )
                for config in configs:
                    row: dict[str, Any] = {"shape": shape, "format": label, "kernel": str(config)}
                    try:
                        y = quant_gemm.quant_gemm(x, q, s, bits, None, None, config)
                        row["rel_err"] = float((y.double() - ref).norm() / ref.norm())
                        t = timed(
                            lambda x=x, q=q, s=s, bits=bits, c=config: quant_gemm.quant_gemm(
                                x, q, s, bits, None, None, c
                            )
                        )
                        row.update(us=t * 1e6, GBps=nbytes / t / 1e9, vs_bf16=t_bf16 / t)
                    except Exception as exc:  # a config this device cannot run is reported, not fatal
                        row["failed"] = f"{type(exc).__name__}: {exc}"[:200]
                    out.append(row)
            del x
        del wb, q8, q4, f8
        if progress is not None:
            progress(out)
    return out


def wide_words(rows: int, bits: int) -> tuple[Any, ...]:
    """A wider grid of the word GEMV's configs than the tuner's (`--wide`): rows a program 2 to 8,
    tiles of 512 to 4,096 codes' bytes (twice the codes for 4-bit), 4 or 8 warps, one or two tiles
    in flight; every thread holds at least a word a row and at most 32 accumulators."""
    from kernels.triton import quant_gemm, quant_gemv

    cpw = quant_gemv.codes_per_word(bits)
    grid = []
    for block_n in (2, 4, 8):
        for tile_bytes in (512, 1024, 2048, 4096):
            block_k = tile_bytes * 8 // bits
            for warps in (4, 8):
                words_a_thread = block_k // cpw // (32 * warps)
                if words_a_thread < 1 or words_a_thread * block_n * rows > 32:
                    continue
                for tiles in (1, 2):
                    grid.append(quant_gemm._words(block_n, block_k, warps, tiles))
    return tuple(grid)


def print_gemv(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if "us" in r:
            err = f"  err {r['rel_err']:.1e}" if "rel_err" in r else ""
            print(
                f"  {r['shape']:<36} {r['format']:<16} {r['kernel']:<34} {r['us']:8.1f} us "
                f"{r['GBps']:6.0f} GB/s  x{r['vs_bf16']:.2f}{err}"
            )
        else:
            print(f"  {r['shape']:<36} {r['format']:<16} {r['kernel']:<34} failed: {r.get('failed')}")
    print("\nbest per shape and format (gemv / dot configs: today's kernel; words: quant_gemv.py)")
    keys = dict.fromkeys((r["shape"], r["format"]) for r in rows if r["format"] != "bf16")
    for shape, fmt in keys:
        timed = [
            r
            for r in rows
            if (r["shape"], r["format"]) == (shape, fmt) and "us" in r and r.get("rel_err", 0.0) < 1e-2
        ]
        old = min(
            (r for r in timed if not r["kernel"].startswith("words")), key=lambda r: r["us"], default=None
        )
        new = min((r for r in timed if r["kernel"].startswith("words")), key=lambda r: r["us"], default=None)
        line = f"  {shape:<36} {fmt:<16}"
        for tag, best in (("old", old), ("words", new)):
            if best is not None:
                line += f"  {tag} {best['kernel']} {best['us']:.1f} us {best['GBps']:.0f} GB/s x{best['vs_bf16']:.2f}"
        print(line)


def gemv_only(args: argparse.Namespace, device: torch.device) -> int:
    cfg = tiny(MODELS[args.model]) if args.smoke else MODELS[args.model]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "--smoke --gemv-only runs the Triton kernels on the interpreter: set TRITON_INTERPRET=1",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(0)
    ceil = measure_ceilings(device, SMOKE if args.smoke else FULL)
    print(f"ceilings: copy {ceil.copy_gbps:.0f} GB/s, matmul {ceil.matmul_tflops:.1f} TFLOP/s", flush=True)

    def write(rows: list[dict[str, Any]]) -> Path:
        out = write_report(
            "quant_gemv",
            device_label(device),
            args.smoke,
            args.out,
            {"model": args.model, "ceilings": {"copy_GBps": ceil.copy_gbps}, "gemv": rows},
        )
        return out

    def progress(rows: list[dict[str, Any]]) -> None:
        write(rows)
        print(f"  ... {rows[-1]['shape'].split()[0]} done ({len(rows)} rows)", flush=True)

    shapes = args.shapes.split(",") if args.shapes else None
    row_counts = (1,) if args.smoke or args.wide else (1, 4)
    formats = [f for f in args.formats.split(",") if f != "none"]
    rows = gemv_rows(cfg, device, row_counts, args.smoke, shapes, progress, args.wide, formats)
    what = "the wide grid of word configs" if args.wide else "every candidate config"
    print(f"\n{device_label(device)}: {args.model} decode GEMVs, {what}")
    print_gemv(rows)
    print(f"wrote {write(rows)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script in seconds")
    parser.add_argument("--model", default="Llama-3.1-8B", choices=list(MODELS))
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated subset of " + ", ".join(FORMATS)
    )
    parser.add_argument(
        "--gemv-only",
        action="store_true",
        help="only the M=1 / M=4 GEMVs of the projection shapes, every candidate config (no engine)",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help="(--gemv-only) one row, a wider grid of the word GEMV's configs than the tuner's candidates",
    )
    parser.add_argument(
        "--shapes",
        default="",
        help="(--gemv-only) comma-separated subset of qkv_proj, o_proj, gate_up_proj, down_proj",
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
    if args.gemv_only:
        return gemv_only(args, device)
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
    fp8_tuning: list[str] = []
    gemm = gemm_rows(cfg, device, args.smoke, fp8_tuning)
    print(f"\n{device_name}: {args.model} batch-1 decode, prompt {args.prompt}, output {args.output}")
    for r in decode:
        print(
            f"  {r['format']:<6} {r['tok_per_s']:8.1f} tok/s  x{r['speedup_vs_bf16']:.2f}  "
            f"MBU {r['MBU']:.2f} of {r['bytes_per_step_GB']:.2f} GB/step  weights {r['weight_GB']:.2f} GB  "
            f"KV blocks {r['kv_blocks']}"
        )
    for g in gemm:
        choice = f"  (fp8 chosen: {g['fp8_choice']})" if "fp8_choice" in g else ""
        print(f"  {g['shape']:<22} {g['kernel']:<40} {g['us']:9.1f} us  {g['weight_GBps']:7.0f} GB/s{choice}")
    for line in fp8_tuning:
        print(f"  {line}")
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
            "fp8_tuning": fp8_tuning,
        },
    )
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
