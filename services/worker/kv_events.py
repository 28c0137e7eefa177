"""The prefix cache's change log, for SubscribeKvEvents (the gateway's exact prefix routing).

The block manager reports every block it starts caching (`stored`) and every cached block it
evicts (`evicted`) by its chain hash (services/common/block_hash.py), an event per batch: the
blocks one prefill step registers, the evictions one allocation or one prefix lookup makes. Each event gets the next
sequence number and goes into a bounded ring buffer; a subscriber reads the events after the last
number it saw (`since`). One that fell behind the ring buffer, comes from another epoch (the
worker restarted) or starts fresh gets a snapshot of every cached hash first.

Written on the engine thread, read on the event loop: a lock guards the state, and `listen`
callbacks (run on the writing thread) wake the readers.
"""

from __future__ import annotations

import collections
import itertools
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["stored", "evicted", "snapshot"]


@dataclass(frozen=True)
class KvEvent:
    sequence: int
    kind: EventKind
    hashes: tuple[int, ...]


class KvEventLog:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"the KV event buffer needs room for at least one event, got {capacity}")
        self.epoch = uuid.uuid4().hex
        self.capacity = capacity
        self._lock = threading.Lock()
        self._events: collections.deque[KvEvent] = collections.deque(maxlen=capacity)
        self._last = 0  # sequence number of the newest event
        self._cached: set[int] = set()
        self._listeners: list[Callable[[], None]] = []

    @property
    def last_sequence(self) -> int:
        return self._last

    def stored(self, hashes: list[int]) -> None:
        self._append("stored", hashes)

    def evicted(self, hashes: list[int]) -> None:
        self._append("evicted", hashes)

    def _append(self, kind: EventKind, hashes: list[int]) -> None:
        with self._lock:
            self._last += 1
            self._events.append(KvEvent(self._last, kind, tuple(hashes)))
            if kind == "stored":
                self._cached.update(hashes)
            else:
                self._cached.difference_update(hashes)
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    def since(self, after: int, epoch: str = "") -> list[KvEvent]:
        """The events after sequence number `after` of `epoch`; a snapshot (numbered as the newest
        event, so the reader resumes after it) when they are no longer all buffered or when
        `epoch` is not this log's (a new subscriber passes "")."""
        with self._lock:
            oldest = self._events[0].sequence if self._events else self._last + 1
            if epoch != self.epoch or after > self._last or after < oldest - 1:
                return [KvEvent(self._last, "snapshot", tuple(sorted(self._cached)))]
            return list(itertools.islice(self._events, after - oldest + 1, None))

    def listen(self, notify: Callable[[], None]) -> Callable[[], None]:
        """Call `notify()` after every new event (on the writing thread); returns the unsubscribe."""
        with self._lock:
            self._listeners.append(notify)

        def unsubscribe() -> None:
            with self._lock:
                if notify in self._listeners:
                    self._listeners.remove(notify)

        return unsubscribe
