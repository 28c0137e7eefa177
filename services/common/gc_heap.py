"""Python's garbage collector in a serving process: the start-up heap frozen, each collection timed.

A service's start-up leaves a large heap of objects that live as long as the process (torch's
modules, the model, protobuf descriptors, the tokenizer, pydantic models): a worker holds a few
hundred thousand. CPython's oldest-generation collection walks all of them, holding the GIL the
whole time (tens of milliseconds), and any thread of the process that wants the GIL meanwhile (the
engine thread launching a step, the event loop writing a token) waits. `freeze_startup_heap` moves
that heap into the permanent generation once the service is ready (`gc.freeze`, as vLLM's engine
core and API server do), so later collections walk only what serving allocated since.

`time_collections` reports every collection's pause in `tandem:gc_pause_seconds{generation}` and in
`pause_totals()` (what benchmarks/serving_bench.py reads in its in-process mode).

    freeze_startup_heap()   # once the service is ready (each service's main); times collections too
    time_collections()      # only the timing (idempotent)
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from prometheus_client import Histogram

from services.common import switches
from services.common.metrics import GC_PAUSE, histogram

log = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False
_started: dict[int, float] = {}  # thread id -> perf_counter at the collection's start
_totals: dict[int, list[float]] = {}  # generation -> [collections, seconds]


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
    """Time each collection of this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        gc.callbacks.append(_on_collection)


def pause_histogram() -> Histogram:
    """`tandem:gc_pause_seconds` on the default registry (the gateway adds it to its own)."""
    return histogram(GC_PAUSE)


def pause_totals() -> dict[int, tuple[int, float]]:
    """Per generation: (collections, seconds paused) since `time_collections`."""
    with _lock:
        return {gen: (int(count), seconds) for gen, (count, seconds) in _totals.items()}


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    # Called by the interpreter around each collection, in the collecting thread, GIL held.
    now = time.perf_counter()
    thread = threading.get_ident()
    if phase == "start":
        _started[thread] = now
        return
    start = _started.pop(thread, None)
    if start is None:
        return
    generation = int(info.get("generation", 0))
    pause = now - start
    entry = _totals.setdefault(generation, [0.0, 0.0])
    entry[0] += 1
    entry[1] += pause
    pause_histogram().labels(generation=str(generation)).observe(pause)
