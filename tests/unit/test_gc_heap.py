"""services/common/gc_heap.py: the start-up heap frozen (or not, TANDEM_GC_FREEZE=0) and each
garbage collection timed. The freeze runs in a child process: it would change this one's heap."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client import REGISTRY

from services.common import gc_heap
from services.common.metrics import GC_PAUSE

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import gc
from services.common import gc_heap
heap = [[i] for i in range(50_000)]  # start-up's long-lived objects
frozen = gc_heap.freeze_startup_heap()
print(frozen, gc.get_freeze_count(), sum(n for n, _ in gc_heap.pause_totals().values()))
"""


def _child(freeze: str) -> list[int]:
    env = {**os.environ, "TANDEM_GC_FREEZE": freeze}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return [int(x) for x in out.stdout.split()]


def test_the_start_up_heap_is_frozen_once_ready() -> None:
    frozen, freeze_count, collections = _child("1")
    assert frozen == freeze_count >= 50_000  # the start-up heap, all of it
    assert collections >= 1  # the freeze's own collection, timed


def test_the_switch_leaves_the_collector_as_it_is() -> None:
    frozen, freeze_count, _ = _child("0")
    assert frozen == freeze_count == 0


def test_each_collection_is_timed_by_generation() -> None:
    gc_heap.time_collections()
    gc_heap.time_collections()  # idempotent: one callback
    assert gc.callbacks.count(gc_heap._on_collection) == 1
    gc.disable()  # no automatic collection between the readings: the one below is the only one
    try:
        before = gc_heap.pause_totals().get(1, (0, 0.0))
        sample_before = REGISTRY.get_sample_value(f"{GC_PAUSE}_count", {"generation": "1"}) or 0.0
        gc.collect(1)
        count, seconds = gc_heap.pause_totals()[1]
        sample_after = REGISTRY.get_sample_value(f"{GC_PAUSE}_count", {"generation": "1"})
    finally:
        gc.enable()
    assert count == before[0] + 1 and seconds > before[1]
    assert sample_after == sample_before + 1


def test_a_collection_inside_a_metrics_lock_does_not_deadlock() -> None:
    """The interpreter may collect wherever a thread allocates, holding any lock of its own (the
    metrics registry's, a metric's): the timing callback must take none of them."""
    from services.common import metrics

    gc_heap.time_collections()
    done = threading.Event()

    def collect_under_the_registry_lock() -> None:
        with metrics._create_lock:
            gc.collect(0)
        done.set()

    threading.Thread(target=collect_under_the_registry_lock, daemon=True).start()
    assert done.wait(timeout=30), "the collection's callback waited for the registry's lock"
