"""Host (CPU) time of a small Python call, for the CPU microbenchmarks (host_inputs_bench.py,
mux_pack_bench.py): no device work and no synchronisation, only time.perf_counter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Microseconds per call of `fn`: the median over `repeats` timings of `calls` calls each."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)
