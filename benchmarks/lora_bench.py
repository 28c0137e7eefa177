"""Multi-LoRA decode: the base model against adapters, batch 1 and a batch of 64 mixing 16 adapters.

    python benchmarks/lora_bench.py            # GPU: Llama-3.1-8B shape, rank 16 on all projections
    python benchmarks/lora_bench.py --smoke    # CPU, tiny shapes: checks the script in seconds
    python benchmarks/lora_bench.py --profile  # GPU: also each row's decode graph by kernel
    python benchmarks/lora_bench.py --rows batch --profile  # GPU: the batch-64 rows only (A/B runs)
    python benchmarks/lora_bench.py --rows batch --kernel-configs "expand_columns=512 k_chunk=1024"
                                               # GPU: also the mixed row under other kernel configs
    python benchmarks/lora_bench.py --rows batch --overlap-ab  # GPU: and with the side stream off

Dummy base weights (`--load-format dummy`) and random PEFT adapters written by this script
(adapter_config.json + adapter_model.safetensors, all seven projections, rank --rank), served
exactly as `tandem worker --lora-modules` does, with CUDA graphs. Rows (median decode step time
after the first step, tokens/s = rows / step time):
- batch 1: the base model on a worker without LoRA, the base model on a worker with LoRA on (its
  steps have no adapter rows: they launch no LoRA kernel and replay the decode graphs captured
  without them; target: >= 98% of LoRA off, i.e. the same within noise), and one adapter
  (target: >= 85% of the base);
- batch 64: 64 sequences of the base model with LoRA off, the same with LoRA on (--max-loras 16;
  target >= 98%), against 64 sequences spread over 16 adapters (target: >= 80% of the base).
Each row also records how many decode steps replayed each graph variant ("base" / "lora").
The JSON goes to benchmarks/results/lora_<gpu>_<date>.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from engine_bench import (  # noqa: E402
    MODELS,
    free_engine,
    profile_decode_graph,
    random_prompt,
    step_until_done,
    tiny,
    write_model,
)

from benchmarks.bench_report import device_label, write_report  # noqa: E402
from kernels.triton.lora import LoRAKernelConfig, config, set_config  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from services.worker.request import EngineRequest, SamplingParams  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(path: Path, cfg: dict[str, Any], rank: int, seed: int) -> Path:
    """A random PEFT adapter for every projection of every layer (bf16, small values)."""
    from safetensors.torch import save_file

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {  # module -> (in, out)
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (n_in, n_out) in shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) / n_in**0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.01).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def decode_tok_per_s(
    model_dir: Path,
    cfg: dict[str, Any],
    args: argparse.Namespace,
    batch: int,
    adapters: list[tuple[str, Path]],
    row_adapters: list[str],
    max_loras: int,
) -> tuple[float, dict[str, int]]:
    """Median decode step of `batch` sequences (sequence i under row_adapters[i], "" = base), as
    tokens/s, and the decode steps that replayed each CUDA graph variant."""
    engine = Engine(
        WorkerConfig(
            model=str(model_dir),
            load_format="dummy",
            device=args.device,
            max_num_seqs=max(batch, 1),
            max_model_len=args.prompt + args.output + 16,
            enable_prefix_caching=False,
            lora_modules=tuple(f"{name}={path}" for name, path in adapters),
            max_loras=max_loras,
            max_lora_rank=args.rank,
        )
    )
    gen = torch.Generator().manual_seed(0)
    params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    requests = [
        EngineRequest(
            f"r{i}", tuple(random_prompt(gen, args.prompt, cfg["vocab_size"])), params, lora_name=name
        )
        for i, name in enumerate(row_adapters[:batch])
    ]
    step_times = step_until_done(engine, requests)[2:]  # past the prefill steps
    graphs = engine.runner.graphs
    replays = dict(graphs.replays_by_variant) if graphs is not None else {}
    if args.profile:  # (the variant the last step replayed, of `batch` rows: its mapping is still set)
        label = f"batch {batch}, " + (
            f"{len(set(row_adapters[:batch]) - {''})} adapters" if any(row_adapters[:batch]) else "base"
        )
        label += f" (LoRA {'on' if adapters else 'off'})"
        # the LoRA kernels split by projection: a layer launches qkv, o, gate_up, down in that order
        for line in profile_decode_graph(engine, label, batch=batch, periods={"lora": 4}):
            print(line, flush=True)
    free_engine(engine)
    return batch / statistics.median(step_times), replays


def overlap_off_row(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The mixed batch-N row of a second run of this script with the shrinks' side stream off."""
    command = [sys.executable, str(Path(__file__).resolve()), "--rows", "mixed", "--out", str(out)]
    command += ["--model", args.model, "--rank", str(args.rank), "--batch", str(args.batch)]
    command += ["--adapters", str(args.adapters), "--prompt", str(args.prompt), "--output", str(args.output)]
    command += ["--smoke"] * args.smoke + ["--profile"] * args.profile
    subprocess.run(command, check=True, env={**os.environ, "TANDEM_LORA_OVERLAP": "0"})
    row: dict[str, Any] = json.loads(out.read_text())["rows"][-1]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script in seconds")
    parser.add_argument("--model", default="Llama-3.1-8B", choices=list(MODELS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--profile", action="store_true", help="print each row's decode graph by kernel (GPU)"
    )
    parser.add_argument(
        "--rows",
        default="all",
        choices=["all", "batch", "mixed"],
        help="batch: only the two batch-N rows (base with LoRA off, adapters mixed), for A/B runs; "
        "mixed: the adapters' row alone (--overlap-ab's second process)",
    )
    parser.add_argument(
        "--overlap-ab",
        action="store_true",
        help="also the mixed batch-N row with TANDEM_LORA_OVERLAP=0 (a second process: switches are "
        "read once), against this run's base row",
    )
    parser.add_argument(
        "--kernel-configs",
        default="",
        help="space-separated LoRA kernel configs (kernels/triton/lora.py LoRAKernelConfig, e.g. "
        "'expand_columns=512 k_chunk=1024,num_warps=8'): the mixed batch-N row again under each",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16, help="adapters mixed in the batch")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/lora_<gpu>_<date>.json)"
    )
    args = parser.parse_args(argv)
    try:
        kernel_configs = [LoRAKernelConfig.parse(text) for text in args.kernel_configs.split()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        args.prompt, args.output, args.batch, args.adapters, args.rank = 8, 6, 4, 2, 8
    args.device = "cpu" if args.smoke else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
        return 2
    device_name = device_label(args.device)
    cfg = tiny(MODELS[args.model]) if args.smoke else MODELS[args.model]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.model, cfg)
        adapters = [
            (f"lora-{i}", write_adapter(Path(tmp) / f"lora-{i}", cfg, args.rank, seed=i))
            for i in range(args.adapters)
        ]

        def row(name: str, batch: int, loaded: list[tuple[str, Path]], mix: list[str], slots: int) -> float:
            tps, replays = decode_tok_per_s(model_dir, cfg, args, batch, loaded, mix, slots)
            rows.append({"scenario": name, "batch": batch, "tok_per_s": tps, "graph_replays": replays})
            print(json.dumps(rows[-1]), flush=True)
            return tps

        targets: dict[str, dict[str, Any]] = {}
        if args.rows == "all":
            base1 = row("batch 1, base (LoRA off)", 1, [], [""], 0)
            base1_on = row("batch 1, base (LoRA on)", 1, adapters[:1], [""], 1)
            one = row(f"batch 1, one adapter (rank {args.rank})", 1, adapters[:1], [adapters[0][0]], 1)
            targets["batch1_adapter_vs_base"] = {"ratio": one / base1, "target": 0.85}
            # base rows on a worker with LoRA on run a LoRA-less worker's kernels: equal within noise
            targets["batch1_base_lora_on_vs_off"] = {"ratio": base1_on / base1, "target": 0.98}
        base_b = 0.0
        if args.rows != "mixed":
            base_b = row(f"batch {args.batch}, base (LoRA off)", args.batch, [], [""] * args.batch, 0)
        if args.rows == "all":
            base_b_on = row(
                f"batch {args.batch}, base (LoRA on)", args.batch, adapters, [""] * args.batch, args.adapters
            )
            targets[f"batch{args.batch}_base_lora_on_vs_off"] = {"ratio": base_b_on / base_b, "target": 0.98}
        mix = [adapters[i % args.adapters][0] for i in range(args.batch)]
        mixed = row(f"batch {args.batch}, {args.adapters} adapters", args.batch, adapters, mix, args.adapters)
        if base_b:
            targets[f"batch{args.batch}_mixed_vs_base"] = {"ratio": mixed / base_b, "target": 0.80}
        default = config()
        for kernel_config in kernel_configs:  # (each engine captures its graphs with the config set)
            set_config(kernel_config)
            try:
                name = f"batch {args.batch}, {args.adapters} adapters [{kernel_config}]"
                tps = row(name, args.batch, adapters, mix, args.adapters)
            finally:
                set_config(default)
            rows[-1]["kernel_config"] = str(kernel_config)
            if base_b:
                targets[f"batch{args.batch}_mixed_vs_base [{kernel_config}]"] = {
                    "ratio": tps / base_b,
                    "target": 0.80,
                }
        if args.overlap_ab and base_b:
            child = overlap_off_row(args, Path(tmp) / "overlap_off.json")
            child["scenario"] += " [TANDEM_LORA_OVERLAP=0]"
            rows.append(child)
            print(json.dumps(child), flush=True)
            targets[f"batch{args.batch}_mixed_vs_base [TANDEM_LORA_OVERLAP=0]"] = {
                "ratio": child["tok_per_s"] / base_b,
                "target": 0.80,
            }
    for t in targets.values():
        t["met"] = t["ratio"] >= t["target"]
    print(
        f"\n{device_name}: {args.model}, rank {args.rank} on all projections, prompt {args.prompt}, output {args.output}"
    )
    for r in rows:
        print(f"  {r['scenario']:<40} {r['tok_per_s']:10.1f} tok/s")
    for name, t in targets.items():
        print(
            f"  {name:<40} {t['ratio']:10.2f}  (target >= {t['target']:.2f}: {'met' if t['met'] else 'NOT met'})"
        )
    out = write_report(
        "lora",
        device_name,
        args.smoke,
        args.out,
        {
            "model": args.model,
            "rank": args.rank,
            "prompt": args.prompt,
            "output": args.output,
            "kernel_config": str(config()),
            "rows": rows,
            "targets": targets,
        },
    )
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
