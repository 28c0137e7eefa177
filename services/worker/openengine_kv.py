"""OpenEngine's KV event rpcs (`Control.GetKvEventSources`, `Control.SubscribeKvEvents`) over the
worker's prefix-cache change log (kv_events.py), the one tandem's own SubscribeKvEvents serves.

Mapping: each tandem event is one `KvEventBatch` whose `sequence_number` is tandem's sequence
number: `stored` -> `BlockStored`, `evicted` -> `BlockRemoved`, a snapshot (a new subscriber that
asks for one, or one resuming from a number no longer buffered) -> `AllBlocksCleared` then one
`BlockStored` of every cached block. Block hashes are tandem's chain hashes
(services/common/block_hash.py, unsigned 64-bit) sent as `KvBlockHash{encoding: "int64"}`: the
same 64 bits, 8 bytes big-endian. `BlockStored.token_ids` and `parent_block_hash` are left empty:
the change log keeps only hashes (the chain hash already covers the whole prefix).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from openengine.v1 import kv_pb2
from services.worker.kv_events import KvEvent, KvEventLog

HASH_ENCODING = "int64"
SCHEMA_VERSION = 1


def block_hash(h: int) -> kv_pb2.KvBlockHash:
    return kv_pb2.KvBlockHash(value=h.to_bytes(8, "big"), encoding=HASH_ENCODING)


def endpoint(address: str) -> kv_pb2.KvEndpoint:
    """`host:port` (or `unix:/path`, port 0) as a KvEndpoint."""
    if address.startswith("unix:"):
        return kv_pb2.KvEndpoint(host=address, port=0, protocol="grpc")
    host, _, port = address.rpartition(":")
    return kv_pb2.KvEndpoint(host=host.strip("[]"), port=int(port), protocol="grpc")


def event_source(address: str, buffer_events: int) -> kv_pb2.KvEventSource:
    """The one source a worker has: this gRPC service, protobuf events, data-parallel rank 0."""
    return kv_pb2.KvEventSource(
        transport="grpc",
        endpoint_addr=endpoint(address),
        data_parallel_rank=0,
        encoding="protobuf",
        schema_version=SCHEMA_VERSION,
        max_queue_size=buffer_events,
    )


def to_batch(event: KvEvent, block_size: int) -> kv_pb2.KvEventBatch:
    hashes = [block_hash(h) for h in event.hashes]
    if event.kind == "stored":
        events = [kv_pb2.KvEvent(block_stored=kv_pb2.BlockStored(block_hashes=hashes, block_size=block_size))]
    elif event.kind == "evicted":
        events = [kv_pb2.KvEvent(block_removed=kv_pb2.BlockRemoved(block_hashes=hashes))]
    else:  # snapshot: what a subscriber holds is replaced by the cache as it is now
        events = [
            kv_pb2.KvEvent(all_blocks_cleared=kv_pb2.AllBlocksCleared()),
            kv_pb2.KvEvent(block_stored=kv_pb2.BlockStored(block_hashes=hashes, block_size=block_size)),
        ]
    return kv_pb2.KvEventBatch(
        sequence_number=event.sequence,
        timestamp_unix_nanos=time.time_ns(),
        data_parallel_rank=0,
        events=events,
    )


def check_ranks(ranks: list[int]) -> None:
    """A worker is one data-parallel rank, 0: another rank is an INVALID_ARGUMENT naming the field."""
    others = sorted(set(ranks) - {0})
    if others:
        raise ValueError(f"data_parallel_ranks: this worker is data-parallel rank 0 only, not {others}")


async def subscribe(
    events: KvEventLog,
    block_size: int,
    request: kv_pb2.SubscribeKvEventsRequest,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[kv_pb2.SubscribeKvEventsResponse]:
    """Batches from `start_sequence_number` (inclusive; a snapshot instead when it is no longer
    buffered), or a snapshot first with `include_snapshot`, or new events only; until cancelled."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:
        loop.call_soon_threadsafe(wake.set)

    unsubscribe = events.listen(notify)  # before the first read: nothing is missed
    if request.include_snapshot:
        after, epoch = 0, ""  # "": another epoch, so the log answers with a snapshot
    elif request.start_sequence_number > 0:
        after, epoch = request.start_sequence_number - 1, events.epoch
    else:
        after, epoch = events.last_sequence, events.epoch
    try:
        await context.send_initial_metadata(())  # tells the subscriber it is subscribed
        while True:
            wake.clear()
            batch = events.since(after, epoch)
            for event in batch:
                yield kv_pb2.SubscribeKvEventsResponse(batch=to_batch(event, block_size))
                after, epoch = event.sequence, events.epoch
            if not batch:
                await wake.wait()
    finally:
        unsubscribe()
