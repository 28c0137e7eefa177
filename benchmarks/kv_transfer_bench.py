"""FetchKV speed per transport: GB/s of a prefilled prompt's KV, over loopback TCP and between two
worker processes.

    python benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda --prompt-tokens 4096
    python benchmarks/kv_transfer_bench.py --shape cpu-small --device cpu --prompt-tokens 1024

Starts a prefill worker and a decode worker (dummy weights of the shape, TCP on 127.0.0.1) and:
  device     (CUDA) the device-to-device copy bandwidth of a tensor of the prompt's KV size, the
             ceiling CUDA IPC is judged against;
  loopback   this process Prefills a prompt, then pulls its KV with FetchKV over gRPC, decoding
             the chunks as the decode worker does (kv_wire.py: data viewed, not copied; no device
             copy on this side), for several chunk sizes (FetchKVRequest.chunk_bytes) and
             --fetch-streams (parallel streams, each on its own connection, kv_streams.py);
  worker     for each of --transports (a decode worker started with --kv-transport T; gRPC once
             per --fetch-streams value, as --kv-fetch-streams, keyed "grpc" for the last and
             "grpc@N" for the others): the
             decode worker's Generate with the handle as kv_source, timed by its own log line
             "fetched KV of ... over T: N bytes in T ms" (everything from its FetchKV to the KV in
             its cache: for gRPC device->host, the stream, host->device; for CUDA IPC the
             mapping and the device copy);
  ttft       (--ttft, default on) time to the first and to the second token of a prompt, as a
             client of the gateway sees them (max_tokens 2, this process plays the gateway):
               unified          Generate on one worker (the prefill worker: same device share);
               layerwise-off    Prefill on the prefill worker (first token), then Generate with
                                its handle on the decode worker (second token: after the fetch);
               layerwise-on     PrefillStream; Generate on the decode worker as soon as the
                                handle arrives (its FetchKV takes each layer while the later
                                ones are computed); both tokens from the decode worker.
             The second token is where a transfer shows: unified = prefill + one decode step.
Each point is the median of --repeats fetches of distinct prompts (no prefix-cache hit).
JSON to --out; a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


import grpc  # noqa: E402
import spy_record  # noqa: E402
from engine_bench import MODELS  # noqa: E402  (the benchmark shapes, BENCHMARKS.md)

from services.common.server import GRPC_OPTIONS  # noqa: E402
from services.worker import kv_wire  # noqa: E402
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "Qwen2-0.5B": {**MODELS["Qwen2-0.5B"], "bos_token_id": 151643},
    "Llama-3.1-8B": {**MODELS["Llama-3.1-8B"], "bos_token_id": 128000},
    # a CPU-sized model with a KV of 16 KiB per token in fp32
    "cpu-small": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "eos_token_id": 151643,
        "bos_token_id": 151643,
        "hidden_act": "silu",
    },
}
# a model whose step costs almost nothing on a CPU: what the services cost per token stands out
# (serving_bench.py's cores-busy figures); ids stay below 4096, which every tokenizer decodes
SHAPES["cpu-tiny"] = {**SHAPES["cpu-small"], "hidden_size": 64, "intermediate_size": 128}
SHAPES["cpu-tiny"] |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
SHAPES["cpu-tiny"] |= {"vocab_size": 4096, "eos_token_id": 4095, "bos_token_id": 4094}


def write_model(root: Path, shape: str, tokenizer: Path | None = None) -> Path:
    """A model directory of `shape` (config.json; tokenizer files copied when given)."""
    path = root / shape
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[shape]))
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer / name).exists():
                (path / name).write_bytes((tokenizer / name).read_bytes())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(
    model: Path, role: str, device: str, log: Path, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    address = f"127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "tandem", "worker", "--model", str(model), "--load-format", "dummy"]
    args += ["--role", role, "--address", address, "--device", device, "--max-model-len", "8192", *extra]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, address


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{log.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"worker at {address} not serving:\n{log.read_text()[-3000:]}")


def prefill(stub: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int]) -> worker_pb2.PrefillResponse:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    return stub.Prefill(worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling))


_CHANNELS: dict[tuple[str, int], grpc.Channel] = {}


def loopback_fetch(address: str, handle_id: str, chunk_bytes: int, max_streams: int) -> int:
    """One FetchKV of a handle by this process over up to `max_streams` parallel streams (each on
    its own connection, kept from fetch to fetch as a decode worker keeps them; a further stream
    goes where the first message says: the prefill worker's wire helpers, if it has any); the
    bytes received."""

    def stream(at: str, index: int, request: worker_pb2.FetchKVRequest) -> Any:
        if (at, index) not in _CHANNELS:
            options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            _CHANNELS[at, index] = grpc.insecure_channel(at, options=options)
        return _CHANNELS[at, index].unary_stream(
            "/tandem.v1.Worker/FetchKV",
            request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
            response_deserializer=kv_wire.decode_chunk,
        )(request)

    def drain(chunks: Any) -> int:
        return sum(len(chunk.data) for chunk in chunks)

    first = stream(
        address,
        0,
        worker_pb2.FetchKVRequest(handle_id=handle_id, chunk_bytes=chunk_bytes, max_streams=max_streams),
    )
    head = next(first)
    nbytes = len(head.data)
    addresses = list(head.header.stream_addresses)
    further = [
        (
            addresses[i - 1] if len(addresses) >= i else address,
            i,
            worker_pb2.FetchKVRequest(handle_id=handle_id, chunk_bytes=chunk_bytes, stream_index=i),
        )
        for i in range(1, head.header.streams)
    ]
    with ThreadPoolExecutor(max(1, len(further))) as pool:
        futures = [pool.submit(drain, stream(*f)) for f in further]
        nbytes += drain(first) + sum(f.result() for f in futures)
    return nbytes


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_fetch_lines(log: Path, count: int, timeout_s: float = 10.0) -> list[tuple[str, str, str, str]]:
    """The decode worker's "fetched KV of <id> over <transport>: N bytes in T ms" lines."""
    pattern = re.compile(r"fetched KV of (w2w-\d+) over (\S+?)(?: \([^)]*\))?: (\d+) bytes in ([\d.]+) ms")
    deadline = time.monotonic() + timeout_s
    while True:
        lines = pattern.findall(log.read_text())
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def start_py_spy(out_dir: str, tag: str, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """--py-spy DIR: sample each process at 2,000 Hz until spy_record.stop; nothing without DIR."""
    if not out_dir:
        return []
    exe = spy_record.find_py_spy()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [
        spy_record.record(exe, pid, Path(out_dir) / f"{tag}_{role}_{pid}.txt", 2000)
        for role, pid in pids.items()
    ]


def ipc_copy_rates(log: Path, label: str, num_bytes: int) -> list[float]:
    """GB/s of each measured CUDA IPC fetch's copy in the decode worker's log (the warm-up's left
    out): `label` "the copy call" (the engine thread's copy_ipc_blocks, host-timed from its start
    to the copy's end) or "on the device" (the launch, CUDA events), each followed by "N ms" on
    the fetch's line."""
    pattern = re.compile(rf"fetched KV of (w2w-\d+) over cuda-ipc.*?{label} ([\d.]+) ms")
    times = [float(ms) for rid, ms in pattern.findall(log.read_text()) if rid != "w2w-0"]
    return [num_bytes / (ms / 1e3) / 1e9 for ms in times if ms > 0]


def add_rate(
    results: dict[str, Any], entry: dict[str, Any], key: str, ratio_key: str, rates: list[float]
) -> None:
    """entry[key] = the median of `rates`, and entry[ratio_key] its share of the device copy rate."""
    entry[key] = statistics.median(rates)
    if results.get("device_copy_gb_per_s"):
        entry[ratio_key] = entry[key] / results["device_copy_gb_per_s"]


def fetch_moments(log: Path) -> list[tuple[str, str]]:
    """(request id, "reserved 0.31, first item 1.20, ...") of each fetch in the decode worker's
    log: when each stage of the fetch ended, in ms from its start."""
    pattern = re.compile(r"fetched KV of (w2w-\d+) over .*?\(ms from the start: ([^)]*)\)")
    return pattern.findall(log.read_text())


def stage_medians(moments: list[str]) -> dict[str, float]:
    """The median ms each stage took (from the stage before it; the first from the fetch's
    start), over fetches' moment strings ("reserved 0.31, first item 1.20, ..."), stages in the
    order of the first fetch."""
    per_stage: dict[str, list[float]] = {}
    for line in moments:
        before = 0.0
        for part in line.split(", "):
            name, _, at = part.rpartition(" ")
            per_stage.setdefault(name, []).append(float(at) - before)
            before = float(at)
    return {name: statistics.median(times) for name, times in per_stage.items()}


def token_times(
    p_stub: worker_pb2_grpc.WorkerStub,
    d_stub: worker_pb2_grpc.WorkerStub | None,
    rid: str,
    prompt: list[int],
    mode: str,
) -> tuple[float, float, float | None]:
    """(seconds to the first token, to the second, and for layerwise-on to the prefill worker's
    response: its prefill done) of one request in `mode` (module docstring), from the moment the
    request is sent."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    request = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
    times: list[float] = []

    def tokens_of(stream: Any, start: float) -> None:
        for chunk in stream:
            for choice in chunk.choices:
                times.extend([time.perf_counter() - start] * len(choice.token_ids))

    start = time.perf_counter()
    if mode == "unified":
        generate = worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
        tokens_of(p_stub.Generate(generate), start)
        return times[0], times[1], None
    assert d_stub is not None
    generate = worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
    if mode == "layerwise-on":
        events = p_stub.PrefillStream(request)
        generate.kv_source.CopyFrom(next(events).handle)
        done: list[float] = []

        def prefill_done() -> None:
            for _ in events:  # the prefill's response
                done.append(time.perf_counter() - start)

        waiter = threading.Thread(target=prefill_done)
        waiter.start()
        tokens_of(d_stub.Generate(generate), start)
        waiter.join()
        return times[0], times[1], done[-1] if done else None
    reply = p_stub.Prefill(request)
    times.append(time.perf_counter() - start)
    generate.kv_source.CopyFrom(reply.handle)
    generate.generated_token_ids.extend(reply.first.token_ids)
    tokens_of(d_stub.Generate(generate), start)
    return times[0], times[1], None


def ttft_case(
    p_stub: worker_pb2_grpc.WorkerStub,
    d_stub: worker_pb2_grpc.WorkerStub | None,
    modes: list[str],
    prompt: Any,
    repeats: int,
    tag: str,
) -> dict[str, dict[str, float]]:
    """Median milliseconds to the first and second token per mode (one warm-up each); for
    layerwise-on also to the prefill worker's response (its prefill done: where it is late, the
    prefill itself was slowed, e.g. by the decode worker's writes on the same GPU)."""
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        firsts, seconds, dones = [], [], []
        for r in range(repeats + 1):
            first, second, done = token_times(p_stub, d_stub, f"ttft-{tag}-{mode}-{r}", prompt(), mode)
            if r:
                firsts.append(first * 1e3)
                seconds.append(second * 1e3)
                if done is not None:
                    dones.append(done * 1e3)
        out[mode] = {"ttft_ms": statistics.median(firsts), "second_token_ms": statistics.median(seconds)}
        if dones:
            out[mode]["prefill_done_ms"] = statistics.median(dones)
        print(
            f"{tag} {mode:>13}: first token {out[mode]['ttft_ms']:.1f} ms, "
            f"second token {out[mode]['second_token_ms']:.1f} ms"
            + (f", prefill done {out[mode]['prefill_done_ms']:.1f} ms" if dones else ""),
            flush=True,
        )
    return out


def device_copy_speed(device: str, shape: dict[str, Any], prompt_tokens: int) -> float:
    """GB/s of a device-to-device copy of one prompt's KV (read + write counted once, as a
    transfer's bytes are)."""
    import torch

    heads = shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    numel = shape["num_hidden_layers"] * 2 * prompt_tokens * heads * head_dim
    src = torch.empty(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return numel * 2 / statistics.median(times) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-device", default="", help="the decode worker's device (default: --device)")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--chunk-sizes", default="65536,262144,1048576,4194304,16777216")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--fetch-streams",
        default="1,4",
        help="parallel FetchKV streams to measure, comma-separated (loopback and gRPC worker -> worker)",
    )
    ap.add_argument("--worker-args", default="", help="extra options for both workers")
    ap.add_argument(
        "--transports",
        default="",
        help="decode-side --kv-transport values to measure, comma-separated (default: grpc,cuda-ipc on "
        "CUDA, grpc on the CPU; one that cannot run falls back to gRPC, which the log line shows)",
    )
    ap.add_argument(
        "--ttft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the first and second token: unified vs disaggregated, layer-wise push on and off",
    )
    ap.add_argument(
        "--py-spy",
        default="",
        help="directory: sample both workers with py-spy (2,000 Hz, idle time left out) during each "
        "transport's worker -> worker fetches; a summary per process in DIR/spy_top.txt",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    extra = args.worker_args.split()
    if args.device.startswith("cuda"):
        extra += ["--gpu-memory-utilization", "0.3", "--enforce-eager"]
    else:
        extra += ["--kv-cache-memory", "1GiB", "--cpu-threads", "1"]
    sizes = [int(s) for s in args.chunk_sizes.split(",")]
    stream_counts = [int(s) for s in args.fetch_streams.split(",")]
    transports = [t for t in args.transports.split(",") if t] or (
        ["grpc", "cuda-ipc"] if args.device.startswith("cuda") else ["grpc"]
    )
    vocab = SHAPES[args.shape]["vocab_size"]
    results: dict[str, Any] = {
        "shape": args.shape,
        "device": args.device,
        "decode_device": args.decode_device or args.device,
        "prompt_tokens": args.prompt_tokens,
        "loopback": [],
        "worker_to_worker": {},
        "ttft": {},
    }
    if args.device.startswith("cuda"):
        results["device_copy_gb_per_s"] = device_copy_speed(
            args.device, SHAPES[args.shape], args.prompt_tokens
        )
        print(f"device copy: {results['device_copy_gb_per_s']:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_model(root, args.shape)
        p_proc, p_addr = start_worker(model, "prefill", args.device, root / "prefill.log", extra)
        procs = [p_proc]
        try:
            wait_serving(p_addr, p_proc, root / "prefill.log")
            channel = grpc.insecure_channel(p_addr, options=list(GRPC_OPTIONS))
            p_stub = worker_pb2_grpc.WorkerStub(channel)
            info = p_stub.Info(worker_pb2.InfoRequest())
            results["worker_device"] = info.device
            results["dtype"] = info.dtype
            counter = [0]

            def prompt() -> list[int]:
                counter[0] += 1
                base = counter[0] * 7919
                return [(base + i * 104729) % (vocab - 10) + 3 for i in range(args.prompt_tokens)]

            prefill(p_stub, "warm", prompt())  # first-use costs (allocator, kernels)
            for size in [0, *sizes]:  # 0 = the worker's default
                for streams in stream_counts:
                    speeds, nbytes = [], 0
                    for r in range(args.repeats + 1):
                        reply = prefill(p_stub, f"lb-{size}-{streams}-{r}", prompt())
                        start = time.perf_counter()
                        nbytes = loopback_fetch(p_addr, reply.handle.handle_id, size, streams)
                        elapsed = time.perf_counter() - start
                        if r:  # the first fetch of each size warms up
                            speeds.append(nbytes / elapsed / 1e9)
                    point = {
                        "chunk_bytes": size or "default",
                        "streams": streams,
                        "bytes": nbytes,
                        "gb_per_s": statistics.median(speeds),
                        "samples": speeds,
                    }
                    results["loopback"].append(point)
                    print(
                        f"loopback chunk {point['chunk_bytes']!s:>9} x{streams} streams: "
                        f"{nbytes / 2**20:.1f} MiB at {point['gb_per_s']:.2f} GB/s",
                        flush=True,
                    )
            if args.ttft:
                results["ttft"]["unified"] = ttft_case(p_stub, None, ["unified"], prompt, args.repeats, "p")[
                    "unified"
                ]
            # worker to worker: the decode worker's own measurement (its log line per fetch)
            runs = [
                (t, n, t if n == stream_counts[-1] or t != "grpc" else f"grpc@{n}")
                for t in transports
                for n in (stream_counts if t == "grpc" else stream_counts[-1:])
            ]
            for transport, streams, key in runs:
                log = root / f"decode-{key}.log"
                d_proc, d_addr = start_worker(
                    model,
                    "decode",
                    args.decode_device or args.device,
                    log,
                    [*extra, "--kv-transport", transport, "--kv-fetch-streams", str(streams)],
                )
                procs.append(d_proc)
                wait_serving(d_addr, d_proc, log)
                d_stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(d_addr, options=list(GRPC_OPTIONS)))
                spies = start_py_spy(args.py_spy, key, {"prefill": p_proc.pid, "decode": d_proc.pid})
                for r in range(args.repeats + 1):
                    p = prompt()
                    reply = prefill(p_stub, f"w2w-{r}", p)
                    request = worker_pb2.GenerateRequest(
                        request_id=f"w2w-{r}",
                        prompt_token_ids=p,
                        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                        generated_token_ids=list(reply.first.token_ids),
                        kv_source=reply.handle,
                    )
                    for _ in d_stub.Generate(request):
                        pass
                spy_record.stop(spies)
                lines = wait_fetch_lines(log, args.repeats + 1)
                speeds = [int(b) / (float(ms) / 1e3) / 1e9 for rid, _, b, ms in lines if rid != "w2w-0"]
                used = sorted({used for _, used, _, _ in lines})
                num_bytes = int(lines[-1][2]) if lines else 0
                entry: dict[str, Any] = {
                    "transport_used": used,
                    "streams": streams,
                    "bytes": num_bytes,
                    "gb_per_s": statistics.median(speeds) if speeds else None,
                    "samples": speeds,
                }
                results["worker_to_worker"][key] = entry
                # CUDA IPC: the engine thread's copy call (its line's "the copy call N ms") and the
                # copy on the device ("on the device N ms"), and their shares of the device copy
                # rate measured above (the issue's >= 50%)
                copy_note = ""
                if copy_speeds := ipc_copy_rates(log, "the copy call", num_bytes):
                    add_rate(results, entry, "copy_call_gb_per_s", "copy_call_vs_device_copy", copy_speeds)
                    copy_note = f"; the engine thread's copy call {entry['copy_call_gb_per_s']:.1f} GB/s"
                if kernel_speeds := ipc_copy_rates(log, "on the device", num_bytes):
                    add_rate(
                        results, entry, "copy_kernel_gb_per_s", "copy_kernel_vs_device_copy", kernel_speeds
                    )
                    copy_note += (
                        f" (its kernel, timed on the device: {entry['copy_kernel_gb_per_s']:.1f} GB/s)"
                    )
                print(
                    f"worker -> worker, --kv-transport {transport} x{streams} streams (used {','.join(used)}): "
                    f"{entry['gb_per_s']} GB/s{copy_note}",
                    flush=True,
                )
                moments = [m for rid, m in fetch_moments(log) if rid != "w2w-0"]
                entry["moments_ms"] = moments
                for m in moments:
                    print(f"    its stages, ms from the fetch's start: {m}", flush=True)
                if moments:  # where the fetch's time goes (docs/disaggregation.md names the stages)
                    entry["stage_ms"] = stage_medians(moments)
                    stages = ", ".join(f"{name} {ms:.3f}" for name, ms in entry["stage_ms"].items())
                    print(f"    median ms per stage (each from the one before): {stages}", flush=True)
                if args.ttft and key == transport:
                    modes = ["layerwise-off", "layerwise-on"]
                    case = ttft_case(p_stub, d_stub, modes, prompt, args.repeats, transport)
                    unified = results["ttft"]["unified"]
                    for row in case.values():  # disaggregated / unified, the 10% target
                        row["ttft_vs_unified"] = row["ttft_ms"] / unified["ttft_ms"]
                        row["second_token_vs_unified"] = row["second_token_ms"] / unified["second_token_ms"]
                    results["ttft"][transport] = case
                stop([d_proc])
        finally:
            stop(procs)
    out = args.out or str(
        REPO / "benchmarks" / "results" / f"kv_transfer_{args.shape}_{args.device.split(':')[0]}.json"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    if args.py_spy:  # where each worker's time went during the fetches
        summary = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "spy_top.py"), args.py_spy, "--top", "40"],
            capture_output=True,
            text=True,
        ).stdout
        (Path(args.py_spy) / "spy_top.txt").write_text(summary)
        print(f"wrote {Path(args.py_spy) / 'spy_top.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
