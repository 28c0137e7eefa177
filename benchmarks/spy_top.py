"""Summarize `py-spy record --format raw` files: the functions where each process spends its samples.

    python benchmarks/spy_top.py DIR [--top 25]

For every file (one process, written by serving_bench.py --py-spy): per thread, the share of
samples, and the self (innermost frame) and inclusive shares of the top functions.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarize(path: Path, top: int) -> None:
    self_count: Counter[str] = Counter()
    incl_count: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0]] += count
            frames = frames[1:]
        if frames:
            self_count[frames[-1]] += count
        for f in set(frames):
            incl_count[f] += count
    print(f"== {path.name}: {total} samples")
    for name, k in threads.most_common(6):
        print(f"   thread {k / total:6.1%} {name}")
    print("   self:")
    for name, k in self_count.most_common(top):
        print(f"   {k / total:6.1%} {name[:150]}")
    print("   inclusive:")
    for name, k in incl_count.most_common(top):
        print(f"   {k / total:6.1%} {name[:150]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for path in sorted(Path(args.dir).glob("*.txt")):
        summarize(path, args.top)


if __name__ == "__main__":
    main()
