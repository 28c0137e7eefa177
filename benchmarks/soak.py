"""Soak: the real stack (stories260K on CPU) under a steady mixed load for a long time, with
periodic overload bursts and a worker kill -9 / restart, recording failures and the memory of
the gateway and the styler: their RSS slope in bytes per request (least squares over the samples
after the first third, once warm) must stay under `RSS_SLOPE_BOUND` (tests/reliability/slope.py),
or the run fails. Workers are killed and restarted on purpose, so they have no slope. The result
goes to benchmarks/results/soak_<date>.json.

    .venv/bin/python benchmarks/soak.py --minutes 10 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.load import Load  # noqa: E402
from tests.reliability.rstack import ReliabilityStack, rss_bytes  # noqa: E402
from tests.reliability.slope import RSS_SLOPE_BOUND, slope_per_request  # noqa: E402

SERVICES = ("gateway", "styler")  # the services whose memory slope is checked


async def burst(url: str, num_requests: int, concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    body = {"prompt": "Once upon a time", "max_tokens": 8}
    async with aiohttp.ClientSession() as session:
        queue = iter(range(num_requests))

        async def client() -> None:
            for _ in queue:
                async with session.post(url + "/v1/completions", json=body) as reply:
                    await reply.read()
                    statuses[reply.status] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


async def soak(model: Path, minutes: float, concurrency: int) -> dict[str, object]:
    run_dir = Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    stack = ReliabilityStack(
        run_dir, model, num_workers=2, gateway_args=["--max-running", "8", "--max-waiting", "16"]
    )
    stack.start()
    try:
        pids = {name: stack.procs[name].pid for name in SERVICES}
        load = Load(stack.url, concurrency=concurrency)
        load.start()
        num_requests = 0  # burst requests; the load's are counted from its outcomes

        def sample() -> dict[str, tuple[int, int]]:
            served = num_requests + len(load.outcomes)
            return {name: (served, rss_bytes(pid)) for name, pid in pids.items()}

        samples = [sample()]
        bursts: list[dict[str, int]] = []
        kills = 0
        started = time.monotonic()
        period = 0
        while time.monotonic() - started < minutes * 60:
            await asyncio.sleep(10)
            period += 1
            samples.append(sample())
            if period % 3 == 0:
                statuses = await burst(stack.url, 500, 240)
                num_requests += 500
                bursts.append({str(k): v for k, v in statuses.items()})
            if period % 6 == 0:  # kill -9 a worker and bring it back
                victim = (period // 6) % 2
                stack.procs[f"worker-{victim}"].send_signal(signal.SIGKILL)
                stack.procs[f"worker-{victim}"].wait()
                stack.start_worker(victim)
                kills += 1
        await load.stop()
        samples.append(sample())
        warm = samples[len(samples) // 3 :]
        memory = {
            name: {
                "rss_mib_start": samples[0][name][1] >> 20,
                "rss_mib_end": samples[-1][name][1] >> 20,
                "slope_bytes_per_request": round(slope_per_request([s[name] for s in warm]), 1),
            }
            for name in SERVICES
        }
        kinds = Counter(o.kind for o in load.outcomes)
        return {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": model.name,
            "minutes": minutes,
            "concurrency": concurrency,
            "streams": dict(kinds),
            "error_details": dict(Counter(o.detail for o in load.outcomes if o.kind != "ok")),
            "overload_bursts": bursts,
            "worker_kills": kills,
            "memory": memory,
            "rss_slope_bound_bytes_per_request": RSS_SLOPE_BOUND,
        }
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    result = asyncio.run(soak(Path(args.model), args.minutes, args.concurrency))
    out = REPO / "benchmarks" / "results" / f"soak_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    streams: dict[str, int] = result["streams"]  # type: ignore[assignment]
    memory: dict[str, dict[str, float]] = result["memory"]  # type: ignore[assignment]
    hung = streams.get("hung", 0)
    slopes = {name: m["slope_bytes_per_request"] for name, m in memory.items()}
    leaking = {name: s for name, s in slopes.items() if s >= RSS_SLOPE_BOUND}
    if leaking:
        print(f"RSS grows {leaking} bytes per request: at or above the bound {RSS_SLOPE_BOUND}")
    return 0 if hung == 0 and not leaking else 1


if __name__ == "__main__":
    sys.exit(main())
