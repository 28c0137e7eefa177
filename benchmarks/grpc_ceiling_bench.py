"""What grpcio itself moves over loopback TCP, with no tandem code: the ceiling of the gRPC KV path.

    python benchmarks/grpc_ceiling_bench.py --connections 1,2,4,8 --servers 1,4 --out grpc_ceiling.json

Server processes (grpc.aio, as the worker's server) each stream a prebuilt `bytes` message of
--message-bytes over and over (identity serializers: no protobuf, no copy in Python); clients pull
--total-bytes in all over N connections at once, in two layouts:
  thread  N connections pulled by N threads of one client process (as a decode worker's parallel
          FetchKV streams: one process, one GIL);
  proc    N client processes, one connection each.
Connections go round-robin over the server processes: with one server, all N streams are served by
one process (as a prefill worker serves a fetch's streams). --malloc runs every point with each of:
glibc's defaults (`default`); the worker's thresholds in every process (`buffers`:
services/common/large_buffers.py, buffers of megabytes reused, not mapped and unmapped per
message); those and one malloc arena for all threads (`buffers+arena1`). Each point is
the median of --repeats. Where one process on each side caps the total whatever N is, more streams
of one FetchKV cannot raise it; where `proc` or more servers scale, the cap is per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.common.large_buffers import keep_large_buffers

OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# --channel-options: grpc core's defaults, or HTTP/2 frames of up to 16 MiB (HTTP/2's default is
# 16 KiB: a 4 MiB message is 256 DATA frames) with socket reads sized from 1 to 16 MiB, set on both
# the server and the client.
CHANNEL_OPTIONS: dict[str, list[tuple[str, int]]] = {
    "default": [],
    "large-frames": [
        ("grpc.http2.max_frame_size", 16 << 20),
        ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
    ],
}
METHOD = "/ceiling.Bench/Stream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int, message_bytes: int, options: list[tuple[str, int]]) -> None:
    payload = os.urandom(message_bytes)

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(int(request)):
            yield payload

    async def run() -> None:
        server = grpc.aio.server(options=OPTIONS + options)
        handler = grpc.method_handlers_generic_handler(
            "ceiling.Bench", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def connect(port: int, options: list[tuple[str, int]]) -> grpc.UnaryStreamMultiCallable:
    """A call on a connection of its own (no subchannel shared with the process's other channels)."""
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[*OPTIONS, *options, ("grpc.use_local_subchannel_pool", 1)]
    )
    call = channel.unary_stream(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    sum(len(m) for m in call(b"2"))  # connected and warm
    return call


def client_process(ports: list[int], messages: int, options: list[tuple[str, int]]) -> None:
    """One client process: a connection per port, each pulled by a thread of its own; says ready
    once connected, pulls on "go" and prints the bytes received."""
    calls = [connect(p, options) for p in ports]
    received: list[int] = []

    def pull(call: grpc.UnaryStreamMultiCallable) -> None:
        received.append(sum(len(m) for m in call(str(messages).encode())))

    print("ready", flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=pull, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(received), flush=True)


def start(role: str, malloc: str, options: str, value: int, ports: list[int]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, role, malloc, options, str(value), *map(str, ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"{role} did not start: {line!r}"
    return proc


def run_clients(groups: list[list[int]], messages: int, malloc: str, options: str) -> tuple[int, float]:
    """One client process per group of ports: the bytes all of them received, and the seconds from
    "go" to the last one's answer."""
    procs = [start("--client", malloc, options, messages, ports) for ports in groups]
    began = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    total = sum(int(p.stdout.readline()) for p in procs if p.stdout is not None)
    elapsed = time.perf_counter() - began
    for p in procs:
        p.wait()
    return total, elapsed


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--serve", "--client"):
        role, malloc, options = sys.argv[1], sys.argv[2], CHANNEL_OPTIONS[sys.argv[3]]
        value, ports = int(sys.argv[4]), list(map(int, sys.argv[5:]))
        if malloc != "default":
            assert keep_large_buffers(arena_max=1 if malloc == "buffers+arena1" else 0)
        serve(ports[0], value, options) if role == "--serve" else client_process(ports, value, options)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--message-bytes", type=int, default=4 << 20)
    ap.add_argument("--total-bytes", type=int, default=512 << 20)
    ap.add_argument("--connections", default="1,2,4,8")
    ap.add_argument("--servers", default="1,4", help="server process counts, comma-separated")
    ap.add_argument("--layouts", default="thread,proc")
    ap.add_argument(
        "--malloc", default="default,buffers,buffers+arena1", help="malloc settings, comma-separated"
    )
    ap.add_argument(
        "--channel-options",
        default="default,large-frames",
        help=f"grpc option sets, comma-separated, of: {', '.join(CHANNEL_OPTIONS)}",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = []
    settings = [(m, o) for o in args.channel_options.split(",") for m in args.malloc.split(",")]
    for malloc, options in settings:
        for num_servers in [int(s) for s in args.servers.split(",")]:
            ports = [free_port() for _ in range(num_servers)]
            servers = []
            try:
                servers += [start("--serve", malloc, options, args.message_bytes, [p]) for p in ports]
                for layout in args.layouts.split(","):
                    for n in [int(c) for c in args.connections.split(",")]:
                        messages = max(1, args.total_bytes // args.message_bytes // n)
                        targets = [ports[i % num_servers] for i in range(n)]
                        groups = [targets] if layout == "thread" else [[t] for t in targets]
                        speeds = []
                        for _ in range(args.repeats):
                            nbytes, seconds = run_clients(groups, messages, malloc, options)
                            speeds.append(nbytes / seconds / 1e9)
                        point = {
                            "malloc": malloc,
                            "channel_options": options,
                            "servers": num_servers,
                            "layout": layout,
                            "connections": n,
                            "message_bytes": args.message_bytes,
                            "gb_per_s": statistics.median(speeds),
                            "samples": speeds,
                        }
                        results.append(point)
                        print(
                            f"{malloc:15}  {options:12}  servers {num_servers}  {layout:6} x{n:<2}  "
                            f"{point['gb_per_s']:6.2f} GB/s  ({', '.join(f'{s:.2f}' for s in speeds)})",
                            flush=True,
                        )
            finally:
                for s in servers:
                    s.kill()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cores": os.cpu_count(), "points": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
