"""Keep freed large buffers in the process instead of handing them back to the OS (glibc malloc).

grpc core reads a message into slices it mallocs, Python builds each received message as one
`bytes`, and the sender's wire bytes are one more: every KV chunk over gRPC is a few buffers of
megabytes, allocated and freed once each. glibc serves a request above its mmap threshold (128 KiB
at first, raised only as far as a freed mapped chunk's size) with a fresh mapping and unmaps it on
free, so each chunk pays page faults and the kernel's zeroing of every page, on top of the copies.
With the threshold above the chunks' size, they come from the heap and are reused; the trim
threshold keeps that much freed heap from going back at once. This bounds nothing else: what is
kept is at most what was once in use. grpc core's threads each take a malloc arena of their own,
whose heaps glibc trims and regrows by its own rules; `arena_max` 1 keeps every thread on the main
heap (a process whose threads mostly wait on the GIL loses nothing to the shared lock).

`keep_large_buffers()` sets both with `mallopt` (no-op without glibc). The worker calls it at start
with TANDEM_KEEP_LARGE_BUFFERS=1 (switches.py: an A/B, off by default: grpcio alone gains from it,
the worker-to-worker fetch measured slower, docs/disaggregation.md round 16);
benchmarks/grpc_ceiling_bench.py measures grpcio with and without (`--malloc`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling (half its 64 MiB arena heap); above the default chunks
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_large_buffers(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES, arena_max: int = 0
) -> bool:
    """Serve allocations up to `mmap_threshold` bytes from the heap and keep up to `trim_threshold`
    bytes of freed heap; with `arena_max` > 0, at most that many malloc arenas for threads that
    allocate for the first time from now on. False (and nothing changed) where the C library is not
    glibc. Call it before the process starts its threads."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has mallopt as a stub)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    if done and arena_max > 0:
        done = bool(mallopt(_M_ARENA_MAX, arena_max))
    if not done:
        log.warning("mallopt refused the large-buffer thresholds; KV chunks keep their per-chunk mappings")
    return done
