"""Heap snapshots on demand, for finding slow leaks in a running service.

With `TANDEM_HEAP_PROFILE=DIR` in its environment a service starts `tracemalloc` (10 frames per
allocation) and writes a snapshot to `DIR/<pid>-<n>.tracemalloc` on each SIGUSR2. Diff two with

    a, b = (tracemalloc.Snapshot.load(p) for p in (first, second))
    for stat in b.compare_to(a, "traceback")[:10]: print(stat, *stat.traceback.format())

Off by default: tracing every allocation slows a service down severalfold.
"""

from __future__ import annotations

import itertools
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

from services.common.switches import HEAP_PROFILE


def install_from_env() -> None:
    """Start tracing and snapshot on SIGUSR2 when TANDEM_HEAP_PROFILE names a directory."""
    directory = HEAP_PROFILE.value
    if not directory or not hasattr(signal, "SIGUSR2"):
        return
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()
    tracemalloc.start(10)

    def dump(_signum: int, _frame: FrameType | None) -> None:
        path = out / f"{os.getpid()}-{next(counter)}.tracemalloc"
        tracemalloc.take_snapshot().dump(str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)  # complete files only: readers poll for the name

    signal.signal(signal.SIGUSR2, dump)
