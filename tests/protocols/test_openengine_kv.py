"""OpenEngine's KV event rpcs (Control.GetKvEventSources / SubscribeKvEvents) with the generated
stubs: a subscriber sees the blocks a request's prefill stores, in sequence, and can resume.

Like the rest of the suite it runs against `--target HOST:PORT` too; tandem-only checks (the
`own_worker` fixture) compare the hashes with tandem's block hash and assert tandem's answers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from gateway.router import Router
from openengine.v1 import generation_pb2, kv_pb2, openengine_pb2_grpc, server_pb2
from services.common.block_hash import block_hashes


@pytest.fixture(scope="module")
def control(channel: grpc.Channel) -> openengine_pb2_grpc.ControlStub:
    return openengine_pb2_grpc.ControlStub(channel)


@pytest.fixture(scope="module")
def block_size(control: openengine_pb2_grpc.ControlStub) -> int:
    return int(control.GetServerInfo(server_pb2.GetServerInfoRequest()).capacity.kv_block_size) or 16


def fresh_prompt(num_tokens: int) -> list[int]:
    """Token ids no earlier request sent (so their blocks are stored now, not already cached)."""
    seed = uuid.uuid4().bytes * 4
    return [5 + seed[i % len(seed)] + (i % 2) * 200 for i in range(num_tokens)]


def prefill(channel: grpc.Channel, prompt: list[int]) -> None:
    stub = openengine_pb2_grpc.InferenceStub(channel)
    request = generation_pb2.GenerateRequest(
        request_id=str(uuid.uuid4()),
        token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=generation_pb2.SamplingParams(temperature=0.0),
        stopping=generation_pb2.StoppingOptions(max_tokens=1),
    )
    list(stub.Generate(request, timeout=60))


def stored(batch: kv_pb2.KvEventBatch) -> list[bytes]:
    return [h.value for e in batch.events if e.HasField("block_stored") for h in e.block_stored.block_hashes]


def until_stored(
    batches: Iterator[kv_pb2.SubscribeKvEventsResponse], wanted: set[bytes]
) -> list[kv_pb2.KvEventBatch]:
    """Batches up to the one that completes `wanted` among the stored hashes."""
    seen: set[bytes] = set()
    got: list[kv_pb2.KvEventBatch] = []
    for reply in batches:
        assert reply.WhichOneof("event") == "batch", reply
        got.append(reply.batch)
        seen.update(stored(reply.batch))
        if wanted <= seen:
            return got
    raise AssertionError("the stream ended before the blocks were stored")


def test_event_sources(control: openengine_pb2_grpc.ControlStub, own_worker: bool) -> None:
    [source] = control.GetKvEventSources(kv_pb2.GetKvEventSourcesRequest()).sources
    assert source.transport in ("grpc", "zmq") and source.encoding
    if own_worker:
        assert (source.transport, source.encoding, source.data_parallel_rank) == ("grpc", "protobuf", 0)
        assert source.endpoint_addr.protocol == "grpc" and source.endpoint_addr.host
        assert source.max_queue_size > 0


def test_subscriber_sees_the_prefill_store_its_blocks(
    channel: grpc.Channel, control: openengine_pb2_grpc.ControlStub, block_size: int, own_worker: bool
) -> None:
    prompt = fresh_prompt(3 * block_size)
    call = control.SubscribeKvEvents(kv_pb2.SubscribeKvEventsRequest(include_snapshot=True), timeout=60)
    try:
        call.initial_metadata()  # subscribed: nothing stored from here on is missed
        if own_worker:  # the snapshot: the subscriber's view starts from the cache as it is
            first = next(call).batch
            assert first.events[0].HasField("all_blocks_cleared")
            assert first.events[1].block_stored.block_size == block_size
        prefill(channel, prompt)
        expected = [h.to_bytes(8, "big") for h in block_hashes(prompt, block_size, 2)]
        if own_worker:
            batches = until_stored(call, set(expected))
        else:  # another engine's hashes are its own: any stored block will do
            batches = [next(call).batch]
            assert stored(batches[0])
    finally:
        call.cancel()
    numbers = [b.sequence_number for b in batches]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    if own_worker:
        events = [e for b in batches for e in b.events if e.HasField("block_stored")]
        assert all(h.encoding == "int64" for e in events for h in e.block_stored.block_hashes)
        assert all(e.block_stored.block_size == block_size for e in events)


def test_resume_from_a_sequence_number(
    channel: grpc.Channel, control: openengine_pb2_grpc.ControlStub, block_size: int, own_worker: bool
) -> None:
    if not own_worker:
        pytest.skip("compares hashes with tandem's")
    prompt = fresh_prompt(2 * block_size)
    wanted = {h.to_bytes(8, "big") for h in block_hashes(prompt, block_size, 1)}
    live = control.SubscribeKvEvents(kv_pb2.SubscribeKvEventsRequest(), timeout=60)  # new events only
    try:
        live.initial_metadata()
        prefill(channel, prompt)
        [*_, hit] = until_stored(live, wanted)
    finally:
        live.cancel()
    again = control.SubscribeKvEvents(
        kv_pb2.SubscribeKvEventsRequest(start_sequence_number=hit.sequence_number), timeout=60
    )
    try:
        replayed = next(again).batch
    finally:
        again.cancel()
    assert replayed.sequence_number == hit.sequence_number
    assert stored(replayed) == stored(hit)


def test_other_data_parallel_ranks_are_refused(
    control: openengine_pb2_grpc.ControlStub, own_worker: bool
) -> None:
    if not own_worker:
        pytest.skip("tandem's answer")
    with pytest.raises(grpc.RpcError) as err:
        control.GetKvEventSources(kv_pb2.GetKvEventSourcesRequest(data_parallel_ranks=[3]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("data_parallel_ranks")
    call = control.SubscribeKvEvents(kv_pb2.SubscribeKvEventsRequest(data_parallel_ranks=[1]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_gateway_router_follows_the_events_over_openengine(
    channel: grpc.Channel, address: str, block_size: int, own_worker: bool
) -> None:
    """tandem's gateway in front of `openengine:ADDR` keeps its KV index from OpenEngine's stream:
    a tandem worker's blocks are then known exactly, as over tandem's own proto."""
    if not own_worker:
        pytest.skip("another engine's hashes are not tandem's")
    router = Router([f"openengine:{address}"], poll_interval_s=0.1)
    await router.start()
    try:
        worker = f"openengine:{address}"
        await until(lambda: router.kv_index.live(worker) is not None)
        prompt = fresh_prompt(3 * block_size)
        hashes = block_hashes(prompt, block_size, 2)
        assert router.kv_index.cached_blocks(worker, hashes) == 0
        await asyncio.to_thread(prefill, channel, prompt)
        await until(lambda: router.kv_index.cached_blocks(worker, hashes) == 2)
        assert router.kv_index.workers[worker].block_size == block_size
    finally:
        await router.close()


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
