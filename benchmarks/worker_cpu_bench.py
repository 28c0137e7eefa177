"""CPU throughput of the worker engine (in-process, no gRPC) on stories260K.

    .venv/bin/python benchmarks/worker_cpu_bench.py                      # batch 1 and 32
    .venv/bin/python benchmarks/worker_cpu_bench.py --batch-sizes 1 8 32 --cpu-threads 2

For each batch size: `batch` requests with distinct random prompts of --prompt-len tokens are
submitted together and run to --max-tokens output tokens each (ignore_eos, greedy), after one
warm-up round. Reported: output tokens/s (all output tokens / wall time, prefill included),
decode tokens/s (output tokens after the first / time after the first token), time to first
token and per-step decode latency. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from services.worker.request import EngineRequest, SamplingParams  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("TANDEM_SHARED", REPO.parent / "shared")) / "models" / "stories260K"


def run_batch(engine: Engine, batch: int, prompt_len: int, max_tokens: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    sp: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        prompt = (1, *torch.randint(3, vocab, (prompt_len - 1,), generator=gen).tolist())
        engine.add_request(EngineRequest(f"b{batch}-{seed}-{i}", prompt, sp))
    start = time.perf_counter()
    first_token_at: float | None = None
    step_times: list[float] = []
    num_tokens = 0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        produced = sum(len(c.token_ids) for out in outputs for c in out.choices)
        num_tokens += produced
        if produced and first_token_at is None:
            first_token_at = t1
        elif produced:
            step_times.append(t1 - t0)
    end = time.perf_counter()
    assert first_token_at is not None and num_tokens == batch * max_tokens
    decode_tokens = num_tokens - batch
    return {
        "batch": batch,
        "output_tokens": num_tokens,
        "wall_s": end - start,
        "output_tokens_per_s": num_tokens / (end - start),
        "decode_tokens_per_s": decode_tokens / max(end - first_token_at, 1e-9),
        "ttft_ms": (first_token_at - start) * 1e3,
        "decode_step_ms_median": statistics.median(step_times) * 1e3 if step_times else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "worker_cpu_stories260K.json"))
    args = parser.parse_args()

    config = WorkerConfig(
        model=args.model,
        device="cpu",
        kv_cache_memory="256MiB",
        cpu_threads=args.cpu_threads,
        max_num_seqs=max(args.batch_sizes),
        enable_prefix_caching=False,  # distinct prompts anyway; measure compute, not cache hits
    )
    engine = Engine(config)
    rows = []
    for batch in args.batch_sizes:
        run_batch(engine, batch, args.prompt_len, min(args.max_tokens, 16), seed=0)  # warm-up
        rows.append(run_batch(engine, batch, args.prompt_len, args.max_tokens, seed=1))

    header = f"{'batch':>5} {'out tok/s':>10} {'decode tok/s':>13} {'TTFT ms':>8} {'step ms':>8}"
    print(
        f"stories260K on CPU ({args.cpu_threads} thread(s)), prompt {args.prompt_len}, {args.max_tokens} tokens each"
    )
    print(header)
    for r in rows:
        print(
            f"{r['batch']:>5} {r['output_tokens_per_s']:>10.0f} {r['decode_tokens_per_s']:>13.0f} "
            f"{r['ttft_ms']:>8.1f} {r['decode_step_ms_median']:>8.2f}"
        )
    result = {
        "benchmark": "worker_cpu",
        "model": Path(args.model).name,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": args.cpu_threads,
        "torch": torch.__version__,
        "attention_backend": engine.ops.name,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
