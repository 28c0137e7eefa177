"""The engine thread's cost of an allocation that evicts cached blocks while a SubscribeKvEvents
reader listens: the real BlockManager and KvEventLog, and a listener that wakes an event loop
running in another thread as rpc.py's SubscribeKvEvents does (`loop.call_soon_threadsafe`, at most
one wake-up on its way at a time). CPU only.

For each size: a sequence of N blocks is computed and freed (N cached blocks), then a sequence of
N other blocks is allocated, which evicts every one of them. Timed: that `allocate` call alone.
`events`: the events it logged.

    python benchmarks/kv_events_bench.py --out benchmarks/results/kv_events.json

Prints a table (microseconds, median of --repeats allocations) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.worker.block_manager import BlockManager
from services.worker.kv_events import KvEventLog
from services.worker.request import EngineRequest, Request, SamplingParams, Sequence

BLOCK = 16


def _sequence(first_token: int, num_tokens: int) -> Sequence:
    req = EngineRequest("bench", tuple(range(first_token, first_token + num_tokens)), SamplingParams())
    return Request(req, max_tokens=1, eos_token_ids=(2,), arrival=0).sequences[0]


def one_allocation(num_blocks: int, loop: asyncio.AbstractEventLoop) -> tuple[float, int]:
    """Seconds of the evicting `allocate`, and the events it logged."""
    log = KvEventLog(1_000_000)
    scheduled = False  # as rpc.py's SubscribeKvEvents: one wake-up on its way at a time

    def woken() -> None:
        nonlocal scheduled
        scheduled = False

    def notify() -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            loop.call_soon_threadsafe(woken)

    log.listen(notify)
    bm = BlockManager(num_blocks, BLOCK, events=log)
    num_tokens = num_blocks * BLOCK
    cached = _sequence(10, num_tokens)
    bm.allocate(cached, num_tokens)
    cached.num_computed_tokens = num_tokens
    bm.register_computed_blocks(cached)
    bm.free_sequence(cached)
    fresh = _sequence(10 + num_tokens, num_tokens)
    before = log.last_sequence
    start = time.perf_counter()
    bm.allocate(fresh, num_tokens)
    seconds = time.perf_counter() - start
    return seconds, log.last_sequence - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", default="16,64,256", help="comma-separated allocation sizes in blocks")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default="", help="JSON path")
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    rows = []
    print(f"{'blocks':>7} {'allocate us':>12} {'events':>7}")
    for num_blocks in (int(b) for b in args.blocks.split(",")):
        runs = [one_allocation(num_blocks, loop) for _ in range(args.repeats)]
        micros = statistics.median(seconds for seconds, _ in runs) * 1e6
        events = runs[0][1]
        rows.append({"blocks": num_blocks, "allocate_us": round(micros, 1), "events": events})
        print(f"{num_blocks:>7} {micros:>12.1f} {events:>7}")
    loop.call_soon_threadsafe(loop.stop)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
