"""How long one small gRPC round trip takes between two grpc.aio processes, with no tandem code:
the floor under a KV fetch's handshake (a CUDA IPC fetch spends ~1.6 ms from its FetchKV call to
the first message on an H100 host) and under each request's hop from gateway to worker.

    python benchmarks/grpc_rtt_bench.py [--calls 200] [--idle-ms 0,1,10] [--out grpc_rtt.json]

A server process (grpc.aio on uvloop, as tandem's services) answers a unary-stream method with one
small message and then holds the stream open, as FetchKV answers a CUDA IPC fetch; the client (its
own process, uvloop) opens the stream, times the first message, cancels. Each point: --calls
calls one after another with --idle-ms of sleep between them (after an idle pause the processes
and their grpc poller threads must be woken: what a quiet server pays per request), over TCP
loopback and over a unix socket. Printed and written: p50 / p90 / p99 of the first message's
latency in us.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_bench import pct

from services.common.server import install_event_loop_policy

METHOD = "/rtt.Rtt/Offer"
ANSWER = b"x" * 512  # about a CUDA IPC offer's size (handle, ids of 256 blocks)


async def serve(address: str) -> None:
    async def offer(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield ANSWER
        await asyncio.sleep(60)  # held open until the caller cancels (as FetchKV for CUDA IPC)

    handler = grpc.method_handlers_generic_handler(
        "rtt.Rtt",
        {"Offer": grpc.unary_stream_rpc_method_handler(offer)},  # bytes in and out: no serializer
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)  # (TCP: "127.0.0.1:0" binds a free port)
    await server.start()
    print("serving", address.replace(":0", f":{port}") if address.endswith(":0") else address, flush=True)
    await server.wait_for_termination()


async def measure(address: str, calls: int, idle_s: float) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        offer = channel.unary_stream(METHOD)
        await anext(aiter(offer(b"warm")))  # the connection is up before the timing
        latencies = []
        for _ in range(calls):
            if idle_s:
                await asyncio.sleep(idle_s)
            start = time.perf_counter()
            call = offer(b"fetch")
            await anext(aiter(call))
            latencies.append(time.perf_counter() - start)
            call.cancel()
        return latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--idle-ms", default="0,1,10", help="sleep between calls, comma-separated")
    ap.add_argument("--serve", default="", help=argparse.SUPPRESS)  # (the server process)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    install_event_loop_policy()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for transport, bind in (("tcp", "127.0.0.1:0"), ("unix", f"unix:{tmp}/rtt.sock")):
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", bind], stdout=subprocess.PIPE, text=True
            )
            try:
                assert server.stdout is not None
                word, _, address = server.stdout.readline().strip().partition(" ")
                assert word == "serving", f"the server did not start on {bind}"
                for idle_ms in (float(x) for x in args.idle_ms.split(",")):
                    us = [t * 1e6 for t in asyncio.run(measure(address, args.calls, idle_ms / 1e3))]
                    row = {
                        "transport": transport,
                        "idle_ms": idle_ms,
                        "calls": args.calls,
                        "p50_us": statistics.median(us),
                        "p90_us": pct(us, 0.9),
                        "p99_us": pct(us, 0.99),
                    }
                    rows.append(row)
                    print(
                        f"{transport:<5} idle {idle_ms:>5.1f} ms: first message p50 {row['p50_us']:7.0f} us, "
                        f"p90 {row['p90_us']:7.0f}, p99 {row['p99_us']:7.0f}",
                        flush=True,
                    )
            finally:
                server.kill()
                server.wait()
    out = Path(args.out or Path(__file__).parent / "results" / "grpc_rtt.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
