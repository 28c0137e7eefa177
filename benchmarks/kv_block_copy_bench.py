"""A CUDA IPC fetch's device copy alone: one prompt's KV blocks from one paged cache into another,
against a plain copy of as many contiguous bytes (issue 20's bar: >= 50% of it).

For a Llama-3.1-8B-shaped cache (32 layers, 8 KV heads of 128, blocks of 16 tokens) and a
4,096-token prompt (256 blocks, 512 MiB in bf16), in one process on one device:

  device copy      dst.copy_(src) of 512 MiB contiguous (the bar)
  slices           the blocks consecutive on both sides: one strided slice copy (torch)
  gather+scatter   scattered ids: index_select into a temporary, then index_put (torch; the CPU
                   path past MAX_COPY_RUNS runs, and what the device path was before the kernel)
  kernel           kernels/triton/kv_block_copy.py, the ids consecutive, then scattered

Each row: the median of --repeats timed copies (CUDA events), GB/s counting the bytes once (a
transfer's bytes), and its share of the device copy's rate. bf16, then fp8 (--kv-cache-dtype fp8).

`--ipc-source` (CUDA) adds the kernel's copy from a source cache that another process allocated
and shared over CUDA IPC, as the decode worker reads the prefill worker's cache: idle, then while
that process keeps the GPU busy with matmuls (two processes' CUDA contexts time-slice one GPU).
In the decode worker the kernel ran at 0.39 of the device copy against 0.67 in one process
(round 23); these rows tell the mapped memory from the sharing of the GPU.

    python benchmarks/kv_block_copy_bench.py [--blocks 256] [--out benchmarks/results/kv_block_copy.json]
    python benchmarks/kv_block_copy_bench.py --smoke   # the CPU (Triton's interpreter): checks the script
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row(dtype: str, name: str, num_bytes: int, seconds: float, device_copy_rate: float) -> dict[str, object]:
    """One table row (GB/s counting the bytes once, against the device copy's rate), printed."""
    rate = num_bytes / seconds / 1e9
    print(f"{dtype:<14} {name:<26} {seconds * 1e6:>9.1f} {rate:>8.1f} {rate / device_copy_rate:>14.2f}")
    return {
        "dtype": dtype,
        "copy": name,
        "bytes": num_bytes,
        "us": seconds * 1e6,
        "gb_per_s": rate,
        "vs_device_copy": rate / device_copy_rate,
    }


def bench_dtype(
    dtype: torch.dtype,
    cache_shape: tuple[int, ...],
    ids: dict[str, tuple[list[int], list[int]]],
    repeats: int,
    device: str,
    tune: bool = False,
) -> list[dict[str, object]]:
    """The table's rows for caches of `dtype` (module docstring), each printed as it is measured."""
    # (imported here: the smoke run sets TRITON_INTERPRET before any kernel module loads)
    from benchmarks.engine_bench import median_time
    from kernels.triton.kv_block_copy import copy_kv_blocks

    layers = cache_shape[0]
    src = torch.empty(cache_shape, dtype=torch.uint8 if dtype.itemsize == 1 else torch.int16, device=device)
    src = src.random_(0, 100).view(dtype)
    dst = torch.zeros_like(src)
    (consecutive_src, consecutive_dst), (scattered_src, scattered_dst) = ids["consecutive"], ids["scattered"]
    n = len(consecutive_src)
    num_bytes = src[:, :, :n].numel() * src.element_size()
    flat_src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat_src)
    s0, d0 = consecutive_src[0], consecutive_dst[0]

    def gather_scatter() -> None:
        index = torch.tensor(scattered_src, device=device)
        dst[:, :, torch.tensor(scattered_dst, device=device)] = src.index_select(2, index)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("device copy", lambda: flat_dst.copy_(flat_src)),
        ("slices (consecutive)", lambda: dst[:, :, d0 : d0 + n].copy_(src[:, :, s0 : s0 + n])),
        ("gather+scatter (scattered)", gather_scatter),
        (
            "kernel (consecutive)",
            lambda: copy_kv_blocks(src, dst, consecutive_src, consecutive_dst, (0, layers)),
        ),
        ("kernel (scattered)", lambda: copy_kv_blocks(src, dst, scattered_src, scattered_dst, (0, layers))),
    ]
    if tune:  # the kernel's launch parameters (piece words, warps, cache modifier)
        for piece in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                for cache in ("", ".cg"):
                    launch = functools.partial(
                        copy_kv_blocks,
                        src,
                        dst,
                        scattered_src,
                        scattered_dst,
                        (0, layers),
                        piece,
                        warps,
                        cache,
                    )
                    cases.append((f"kernel p{piece} w{warps} {cache or 'ca'}", launch))
    rows: list[dict[str, object]] = []
    base = 0.0
    name_of_dtype = str(dtype).removeprefix("torch.")
    for name, fn in cases:
        seconds = median_time(fn, torch.device(device), warmup=1, iters=repeats)
        base = base or num_bytes / seconds / 1e9
        rows.append(_row(name_of_dtype, name, num_bytes, seconds, base))
    want = src[:, :, scattered_src]
    assert torch.equal(dst[:, :, scattered_dst].view(torch.uint8), want.view(torch.uint8)), (
        "the kernel's copy differs"
    )
    return rows


def _ipc_peer(shape: tuple[int, ...], itemsize: int, shared: object, commands: object) -> None:
    """The other process (spawned): allocate the source cache, share it over CUDA IPC (torch's
    queue reduction), then on "busy" run matmuls until the next command, on "stop" exit."""
    import contextlib
    import queue

    cache = torch.empty(shape, dtype=torch.uint8 if itemsize == 1 else torch.int16, device="cuda")
    cache.random_(0, 100)
    shared.put(cache)  # type: ignore[attr-defined]
    a = torch.randn(4096, 4096, device="cuda")
    while True:
        command = commands.get()  # type: ignore[attr-defined]
        while command == "busy":
            for _ in range(8):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
            with contextlib.suppress(queue.Empty):
                command = commands.get_nowait()  # type: ignore[attr-defined]
        if command == "stop":
            return


def bench_ipc_source(
    dtype: torch.dtype,
    cache_shape: tuple[int, ...],
    ids: dict[str, tuple[list[int], list[int]]],
    repeats: int,
    device_copy_rate: float,
) -> list[dict[str, object]]:
    """The kernel's copy (scattered ids) from a cache another process shares over CUDA IPC, with
    that process idle and then busy (module docstring); the rows as bench_dtype's."""
    import torch.multiprocessing as mp

    from benchmarks.engine_bench import median_time
    from kernels.triton.kv_block_copy import copy_kv_blocks

    context = mp.get_context("spawn")
    shared, commands = context.Queue(), context.Queue()
    peer = context.Process(
        target=_ipc_peer, args=(cache_shape, dtype.itemsize, shared, commands), daemon=True
    )
    peer.start()

    def measure() -> list[dict[str, object]]:
        # (the mapped tensors live in here: released before the peer is stopped)
        src = shared.get(timeout=120).view(dtype)  # mapped from the peer's memory
        dst = torch.zeros_like(src)
        src_ids, dst_ids = ids["scattered"]
        layers = cache_shape[0]
        num_bytes = src[:, :, : len(src_ids)].numel() * src.element_size()
        name_of_dtype = str(dtype).removeprefix("torch.")
        rows: list[dict[str, object]] = []
        for name, busy in (
            ("kernel (scattered, IPC source)", False),
            ("kernel (IPC source, peer busy)", True),
        ):
            if busy:
                commands.put("busy")
            seconds = median_time(
                lambda: copy_kv_blocks(src, dst, src_ids, dst_ids, (0, layers)),
                torch.device("cuda"),
                warmup=1,
                iters=repeats,
            )
            rows.append(_row(name_of_dtype, name, num_bytes, seconds, device_copy_rate))
        got = dst[:, :, dst_ids].view(torch.uint8)
        assert torch.equal(got, src[:, :, src_ids].view(torch.uint8)), "the kernel's copy from IPC differs"
        torch.cuda.synchronize()
        return rows

    try:
        return measure()
    finally:
        commands.put("stop")
        peer.join(30)
        if peer.is_alive():
            peer.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=256, help="the prompt's blocks (256: 4,096 tokens)")
    ap.add_argument("--cache-blocks", type=int, default=2048, help="blocks of each cache")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="the CPU, a tiny cache")
    ap.add_argument("--tune", action="store_true", help="also the kernel's launch parameters (scattered ids)")
    ap.add_argument(
        "--ipc-source",
        action="store_true",
        help="(CUDA) also the kernel from a cache another process shares over CUDA IPC, idle and busy",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.ipc_source and args.smoke:
        ap.error("--ipc-source needs CUDA (no --smoke)")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shape = "cpu", (2, 16, 2, 16)  # layers, block size, KV heads, head dim
        args.blocks, args.cache_blocks, args.repeats = 8, 32, 2
    else:
        device, shape = "cuda", (32, 16, 8, 128)
    layers, block_size, heads, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    n = args.blocks
    consecutive_src = list(range(100 % args.cache_blocks, 100 % args.cache_blocks + n))
    consecutive_dst = list(range(7, 7 + n))
    scattered_src = torch.randperm(args.cache_blocks, generator=gen)[:n].tolist()
    scattered_dst = torch.randperm(args.cache_blocks, generator=gen)[:n].tolist()
    rows = []
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"== {n} blocks of a [{layers}, 2, {args.cache_blocks}, {block_size}, {heads}, {head_dim}] cache on {device_name} =="
    )
    print(f"{'dtype':<14} {'copy':<26} {'us':>9} {'GB/s':>8} {'x device copy':>14}")
    ids = {"consecutive": (consecutive_src, consecutive_dst), "scattered": (scattered_src, scattered_dst)}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        shape6 = (layers, 2, args.cache_blocks, block_size, heads, head_dim)
        dtype_rows = bench_dtype(dtype, shape6, ids, args.repeats, device, args.tune)
        rows += dtype_rows
        if args.ipc_source:
            rows += bench_ipc_source(dtype, shape6, ids, args.repeats, float(dtype_rows[0]["gb_per_s"]))  # type: ignore[arg-type]
    results = Path(tempfile.gettempdir()) if args.smoke else Path(__file__).parent / "results"
    out = Path(args.out or results / f"kv_block_copy_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": device_name, "shape": shape, "args": vars(args), "rows": rows}, indent=1)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
