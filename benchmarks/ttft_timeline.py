"""Where a streamed request's first token goes between the services, from their trace spans.

`tandem up` with TANDEM_TRACE_FILE set (serving_bench.py --trace does it) writes every finished
span of the gateway, the styler and the worker to one JSON-lines file. For each traced streaming
request this lines up, on the one wall clock the processes share:

    gateway  request in            the HTTP server span's start
    gateway  worker call           its Generate CLIENT span's start
    worker   rpc in                the Generate SERVER span's start
    worker   scheduled             engine.queue_wait's end (the engine took the request)
    worker   first token           engine.prefill's end (the engine thread's first token)
    worker   first token sent      the Generate span's `first_token_sent` event
    gateway  first token in        the HTTP span's `first_token_from_worker` event
    gateway  first chunk           `first_chunk` (the styler's text, an OpenAI chunk made)
    gateway  first chunk written   `first_chunk_written` (the SSE write)

and prints the median of each step over the requests (a concurrency-1 run makes them clean: at
higher concurrency they include other requests' turns). While tracing, the gateway sends each
request as its own Generate rpc, not on the shared GenerateMany stream.

    python benchmarks/ttft_timeline.py SPANS.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

STAGES = (
    "request in",
    "worker call",
    "rpc in",
    "scheduled",
    "first token",
    "first token sent",
    "first token in",
    "first chunk",
    "first chunk written",
)
GENERATE = "/tandem.v1.Worker/Generate"


def _event(span: dict[str, Any], name: str) -> int | None:
    return next((e["time_ns"] for e in span.get("events", ()) if e["name"] == name), None)


def timelines(spans: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Per traced streaming request (one with all the stages), the wall-clock ns of each stage."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    out = []
    for trace in by_trace.values():
        https = [s for s in trace if s["service"] == "tandem-gateway" and s["kind"] == "SERVER"]
        calls = [s for s in trace if s["kind"] == "CLIENT" and s["name"] == GENERATE]
        rpcs = [s for s in trace if s["kind"] == "SERVER" and s["name"] == GENERATE]
        phases = {s["name"]: s for s in trace if s["name"].startswith("engine.")}
        if (
            len(https) != 1
            or not calls
            or not rpcs
            or not {"engine.queue_wait", "engine.prefill"} <= set(phases)
        ):
            continue
        http, call, rpc = https[0], min(calls, key=lambda s: s["start_time_ns"]), rpcs[0]
        stages = {
            "request in": http["start_time_ns"],
            "worker call": call["start_time_ns"],
            "rpc in": rpc["start_time_ns"],
            "scheduled": phases["engine.queue_wait"]["end_time_ns"],
            "first token": phases["engine.prefill"]["end_time_ns"],
            "first token sent": _event(rpc, "first_token_sent"),
            "first token in": _event(http, "first_token_from_worker"),
            "first chunk": _event(http, "first_chunk"),
            "first chunk written": _event(http, "first_chunk_written"),
        }
        if all(v is not None for v in stages.values()):
            out.append({k: int(v) for k, v in stages.items() if v is not None})
    return out


def summary(lines: list[dict[str, int]]) -> list[tuple[str, float]]:
    """(step, median us) from each stage to the next, then the whole: request in -> written."""
    steps = [
        (f"{a} -> {b}", statistics.median((t[b] - t[a]) / 1e3 for t in lines))
        for a, b in itertools.pairwise(STAGES)
    ]
    whole = statistics.median((t[STAGES[-1]] - t[STAGES[0]]) / 1e3 for t in lines)
    return [*steps, (f"{STAGES[0]} -> {STAGES[-1]}", whole)]


def print_summary(lines: list[dict[str, int]]) -> None:
    print(f"first-token timeline, median of {len(lines)} traced streaming requests (us)")
    for step, us in summary(lines):
        print(f"  {step:<44} {us:9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spans", type=Path, help="a TANDEM_TRACE_FILE of `tandem up`")
    args = parser.parse_args(argv)
    spans = [json.loads(line) for line in args.spans.read_text().splitlines() if line.strip()]
    lines = timelines(spans)
    if not lines:
        print("no traced streaming request with every stage in the file")
        return 1
    print_summary(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
