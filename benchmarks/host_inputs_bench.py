"""The host cost of a step's inputs: `torch.tensor` of Python lists against the flat arrays of
services/worker/host_staging.py (`host_tensor`, `padded_rows`), and a prefill chunk's slot list
built a token at a time against a range a block (`block_slots`, used by model_runner.py). CPU only: this is
the engine thread's Python work before a step, the same on any machine with a GPU.

    python benchmarks/host_inputs_bench.py --out benchmarks/results/host_inputs.json

Prints a table (microseconds a call, median of --repeats timings of --calls calls) and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.host_timing import median_us
from services.worker.host_staging import block_slots, host_tensor, padded_rows


def _slots_per_token(blocks: list[int], bs: int, start: int, end: int) -> list[int]:
    return [blocks[p // bs] * bs + p % bs for p in range(start, end)]


def _padded_lists(tables: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def run(calls: int, repeats: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []

    def row(what: str, size: str, before: Callable[[], object], after: Callable[[], object]) -> None:
        b, a = median_us(before, calls, repeats), median_us(after, calls, repeats)
        rows.append({"what": what, "size": size, "before_us": round(b, 2), "after_us": round(a, 2)})

    for n in (64, 2048, 8192):  # a decode step's rows; prefill chunks' tokens
        values = [rng.randrange(1 << 20) for _ in range(n)]
        assert torch.equal(host_tensor(values, torch.int64), torch.tensor(values, dtype=torch.int64))
        row(
            "int64 list -> tensor",
            f"{n} values",
            functools.partial(torch.tensor, values, dtype=torch.int64),
            functools.partial(host_tensor, values, torch.int64),
        )
    for n, num_blocks in ((8, 4), (64, 72), (256, 72)):  # rows of about `num_blocks` blocks
        tables = [[rng.randrange(1 << 20) for _ in range(num_blocks - rng.randrange(4))] for _ in range(n)]
        width = max(len(t) for t in tables)
        padded = functools.partial(_padded_lists, tables, width)
        assert torch.equal(padded_rows(tables, width), padded())
        row("block table", f"{n} rows x {width}", padded, functools.partial(padded_rows, tables, width))
    bs = 16
    blocks = [rng.randrange(1 << 16) for _ in range(256)]
    for start, end in ((0, 1024), (37, 2085)):
        assert _slots_per_token(blocks, bs, start, end) == block_slots(blocks, bs, start, end)
        row(
            "slots",
            f"{end - start} tokens",
            functools.partial(_slots_per_token, blocks, bs, start, end),
            functools.partial(block_slots, blocks, bs, start, end),
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_inputs.json"))
    args = ap.parse_args()
    rows = run(args.calls, args.repeats)
    print(f"{'what':<22} {'size':<16} {'before us':>10} {'after us':>10}")
    for r in rows:
        print(f"{r['what']:<22} {r['size']:<16} {r['before_us']:>10.2f} {r['after_us']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
