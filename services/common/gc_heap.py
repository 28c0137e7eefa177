"""Python's garbage collector in a serving process: the start-up heap frozen, each collection timed.

A service's start-up leaves a large heap of objects that live as long as the process (torch's
modules, the model, protobuf descriptors, the tokenizer, pydantic models): a worker holds a few
hundred thousand. CPython's oldest-generation collection walks all of them, holding the GIL the
whole time (tens of milliseconds), and any thread of the process that wants the GIL meanwhile (the
engine thread launching a step, the event loop writing a token) waits. `freeze_startup_heap` moves
that heap into the permanent generation once the service is ready (`gc.freeze`, as vLLM's engine
core and API server do), so later collections walk only what serving allocated since.

`time_collections` reports every collection's pause in `tandem:gc_pause_seconds{generation}` and in
`pause_totals()` (what benchmarks/serving_bench.py reads in its in-process mode). The interpreter
calls the timing callback in the middle of whatever allocated, possibly under any lock of that
thread (a prometheus metric's, the metrics registry's), so the callback takes no lock: it adds to
plain per-generation counts, and `PAUSE_COLLECTOR` turns them into the histogram at each scrape.

    freeze_startup_heap()   # once the service is ready (each service's main); times collections too
    time_collections()      # only the timing (idempotent); PAUSE_COLLECTOR on the default registry
"""

from __future__ import annotations

import bisect
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common import switches
from services.common.metrics import GC_BUCKETS, GC_PAUSE, SPECS

log = logging.getLogger(__name__)

GENERATIONS = 3
_lock = threading.Lock()  # (installing only: the callback takes no lock)
_installed = False
_started = 0.0  # perf_counter at the running collection's start (one collection at a time)
# per generation: collections in each bucket of GC_BUCKETS (the last one: above them), seconds
_bucket_counts = [[0] * (len(GC_BUCKETS) + 1) for _ in range(GENERATIONS)]
_seconds = [0.0] * GENERATIONS


def freeze_startup_heap() -> int:
    """Time collections from now on (`time_collections`); collect once, then move every surviving
    object into the permanent generation (unless TANDEM_GC_FREEZE=0); the number of objects frozen."""
    time_collections()
    if not switches.GC_FREEZE.value:
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze the start-up heap: %d objects the collector no longer walks", frozen)
    return frozen


def time_collections() -> None:
    """Time each collection of this process from now on, on the default registry too (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        REGISTRY.register(PAUSE_COLLECTOR)
        gc.callbacks.append(_on_collection)


def pause_totals() -> dict[int, tuple[int, float]]:
    """Per generation that collected: (collections, seconds paused) since `time_collections`."""
    totals = {gen: (sum(_bucket_counts[gen]), _seconds[gen]) for gen in range(GENERATIONS)}
    return {gen: total for gen, total in totals.items() if total[0]}


class _PauseCollector(Collector):
    """`tandem:gc_pause_seconds{generation}` from the callback's counts, at each scrape."""

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(GC_PAUSE, SPECS[GC_PAUSE].help, labels=["generation"])
        for gen in range(GENERATIONS):
            counts, cumulative, buckets = list(_bucket_counts[gen]), 0, []
            for edge, count in zip([*map(str, GC_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric([str(gen)], buckets, _seconds[gen])
        yield family


PAUSE_COLLECTOR = _PauseCollector()  # on the default registry once timing; the gateway adds it to its own


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    # Called by the interpreter around each collection, in the collecting thread, GIL held: no lock.
    global _started
    now = time.perf_counter()
    if phase == "start":
        _started = now
        return
    generation = int(info.get("generation", 0))
    if not _started or not 0 <= generation < GENERATIONS:
        return
    pause = now - _started
    _started = 0.0
    _bucket_counts[generation][bisect.bisect_left(GC_BUCKETS, pause)] += 1
    _seconds[generation] += pause
