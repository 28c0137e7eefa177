"""A gRPC KV fetch over several parallel FetchKV streams, each a range of layers.

    decode worker D                                          prefill worker P
    FetchKV(handle, max_streams=N) ───────────────────────▶  takes the handle; S = min(N, layers,
                                                              MAX_STREAMS) streams
        ◀── KVChunk(streams=S) (no data), then layers [0, L/S) ─┘
    FetchKV(handle, stream_index=1) ──────────────────────▶  joins the open fetch: layers [L/S, 2L/S)
    ...                                                       ...
    each stream's chunks are written as they come            the handle's blocks go back when the
    (one merged stream, `merge`)                             last of its S streams ended

One gRPC stream is one HTTP/2 stream on one connection: its bytes go through one sender and one
receiver at a time (protobuf framing, grpc's copies, the socket), while the reading of the next
chunk out of the cache, the send and the receiver's write into its cache could overlap across
streams, each on its own connection (decode side: one channel per stream index, not shared).

Negotiation keeps older peers working: a prefill worker that predates `max_streams` sends the
whole handle on the first stream and never says `streams`, so the decode worker reads one stream;
a decode worker that predates it never asks, so the prefill worker sends one stream as before.
The first stream owns the fetch: a further stream can join only while it is open, and the
handle's blocks go back when the last stream ended (done, failed or cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from services.worker.kv_handles import HeldKV, KVHandleError

# Streams one fetch may use (what a decode worker asks for is capped at this).
MAX_STREAMS = 8
# Items each stream may have waiting in `merge` before its reading pauses (gRPC's flow control
# then holds the sender back).
MERGE_DEPTH = 2

T = TypeVar("T")


def default_streams(cpu_count: int | None) -> int:
    """--kv-fetch-streams 0: one stream per 4 cores (the process's CPU set), 1 to 4 (each stream keeps a sender thread and
    the receiver busy: on a machine without spare cores they only take turns)."""
    return max(1, min(4, (cpu_count or 1) // 4))


def stream_count(requested: int, num_layers: int) -> int:
    """Streams a fetch gets: what the caller asked for, at most one per layer and MAX_STREAMS."""
    return max(1, min(requested, num_layers, MAX_STREAMS))


def layer_range(num_layers: int, streams: int, index: int, first_empty: bool = False) -> tuple[int, int]:
    """Stream `index`'s layers [start, end) of a fetch over `streams` streams. `first_empty`: the
    first stream carries none and the others split them all (a prefill worker whose wire helpers
    carry the further streams, kv_wire_helpers.py, keeps the KV bytes out of its own process)."""
    if first_empty:
        return (0, 0) if index == 0 else layer_range(num_layers, streams - 1, index - 1)
    return index * num_layers // streams, (index + 1) * num_layers // streams


@dataclass
class _Fetch:
    held: HeldKV
    streams: int
    first_empty: bool
    joined: set[int] = field(default_factory=set)
    open: int = 1  # streams running (the first counts)
    closed: bool = False  # the first stream ended: no more joins
    blocks_sent: int = 0
    all_joined: asyncio.Event = field(default_factory=asyncio.Event)


class ParallelFetches:
    """The prefill side's fetches served over several streams, by handle id. The servicer's event
    loop only (FetchKV coroutines), so it takes no lock."""

    def __init__(self) -> None:
        self._fetches: dict[str, _Fetch] = {}
        self.num_opened = 0  # fetches served over several streams so far (tests, logs)

    def __len__(self) -> int:
        return len(self._fetches)

    def open(self, handle_id: str, held: HeldKV, streams: int, first_empty: bool = False) -> None:
        """The first stream took the handle and serves it over `streams` streams (`first_empty`:
        the first one carries no layers, `layer_range`)."""
        self._fetches[handle_id] = _Fetch(held, streams, first_empty)
        self.num_opened += 1

    def join(self, handle_id: str, index: int, num_layers: int) -> tuple[HeldKV, tuple[int, int], int]:
        """A further stream of an open fetch: its handle, its layers (of the model's
        `num_layers`) and the fetch's stream count."""
        fetch = self._fetches.get(handle_id)
        if fetch is None:
            raise KVHandleError(
                "NOT_FOUND",
                f"KV handle {handle_id!r} has no parallel fetch open on this worker (its first stream ended, "
                "or it was never fetched over several streams)",
            )
        if not 1 <= index < fetch.streams:
            raise KVHandleError(
                "INVALID_ARGUMENT", f"stream_index: {index} is not in [1, {fetch.streams - 1}] for this fetch"
            )
        if fetch.closed:
            raise KVHandleError("NOT_FOUND", f"KV handle {handle_id!r}: its parallel fetch already ended")
        if index in fetch.joined:
            raise KVHandleError(
                "FAILED_PRECONDITION", f"stream_index: stream {index} of this fetch is already open"
            )
        fetch.joined.add(index)
        fetch.open += 1
        if len(fetch.joined) == fetch.streams - 1:
            fetch.all_joined.set()
        return fetch.held, layer_range(num_layers, fetch.streams, index, fetch.first_empty), fetch.streams

    async def wait_joined(self, handle_id: str, timeout_s: float) -> bool:
        """The first stream, its own layers sent: wait until every further stream joined (the
        handle must outlive them), at most `timeout_s`; False when one never came."""
        fetch = self._fetches.get(handle_id)
        if fetch is None:
            return False
        try:
            await asyncio.wait_for(fetch.all_joined.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def leave(self, handle_id: str, num_blocks_sent: int = 0) -> int | None:
        """A stream of the fetch ended (having sent `num_blocks_sent`, the first stream's count):
        the fetch's count when it was the last (the handle's blocks may go back), else None."""
        fetch = self._fetches.get(handle_id)
        if fetch is None:
            return num_blocks_sent
        fetch.open -= 1
        fetch.blocks_sent += num_blocks_sent
        if fetch.open > 0:
            return None
        del self._fetches[handle_id]
        return fetch.blocks_sent

    def close_joins(self, handle_id: str) -> None:
        """The first stream ended: no further stream may join (those open keep going)."""
        fetch = self._fetches.get(handle_id)
        if fetch is not None:
            fetch.closed = True


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[T, None]:
    """The items of several streams as they come (each stream's in its order); the first error
    of any ends it, and closing it cancels the reading of every stream."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=MERGE_DEPTH * len(streams))

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                try:
                    await queue.put(item)
                except asyncio.CancelledError:
                    _discard(item)
                    raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (given to the reader, which ends the merge)
            await queue.put(_Failed(exc))
            return
        await queue.put(_END)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not queue.empty():  # items nobody will read: their buffers go back
            _discard(queue.get_nowait())


def _discard(item: object) -> None:
    """An item dropped unread: free its buffer (a wire helper's slot, `WireChunk.release`)."""
    release = getattr(item, "release", None)
    if release is not None:
        release()
