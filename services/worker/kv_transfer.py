"""Disaggregated prefill/decode: the KV's wire side, streaming a prompt's KV between workers.

    prefill worker                                         decode worker
    Prefill(prompt) -> the prompt's blocks are kept         Generate(prompt, [first], kv_source)
      under a KV handle (kv_handles.py)                      Engine.add_fetching_request: blocks
                                                              for the prompt, its own prefix cache
                                                              first (skip_tokens)
                                              <-- FetchKV(handle, skip_tokens, fingerprint) --
    stream_chunks(): kv_cache[l0:l1, :, blocks[b0:b1]] -->   receive(): each chunk checked and
      as raw bytes, read ahead on a thread                    written into the reserved blocks
    the handle's blocks go back when the stream ends         (Engine.write_fetched_kv); then
                                                              Engine.kv_fetched, or on any failure
                                                              Engine.kv_fetch_failed (the prompt
                                                              is computed here)

Chunks are in the model's layout: layer indices of the whole model and all of its KV heads, so
workers of different tensor / pipeline layouts exchange KV; a parallel group's rank 0 gathers a
chunk from its ranks and scatters a received one to them (kv_reshard.py, on its engine thread).

The transport is negotiated per fetch (kv_transports.py): over gRPC the chunks carry the bytes
(kv_wire.py splices them in and out of the messages without protobuf copies); over CUDA IPC the
first and only chunk names the prefill worker's cache tensor and blocks (`IpcBlocks`), which
`receive` copies device to device.

This module only moves bytes: every state change of a request (reserving blocks, FETCHING, ready
to decode, computing the prompt after all) belongs to the engine and its scheduler, reached here
through the `KVReceiver` methods, each run on the engine thread (through `AsyncEngine.call`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from services.worker import kv_transports
from services.worker.kv_cache import KV_DTYPE_NAMES, KVCache

log = logging.getLogger(__name__)

# Chunks read ahead of the one being sent: overlaps the device->host copy with the network.
READ_AHEAD = 2
# Writes in flight on the engine thread before the receiver waits for the oldest one.
WRITE_WINDOW = 4

# (layer_start, layer_end, block_start, block_end): layers [l0, l1) x the prompt's blocks [b0, b1)
Span = tuple[int, int, int, int]


@dataclass(frozen=True)
class KVChunkData:
    """One FetchKV chunk: layers [layer_start, layer_end) x blocks [block_start, block_end)."""

    layer_start: int
    layer_end: int
    block_start: int  # index into the handle's block list (skipped blocks counted)
    block_end: int
    data: bytes | memoryview  # raw little-endian, C-contiguous (format "B" when a memoryview)
    dtype: str  # "bfloat16", ...
    shape: tuple[int, ...]  # [layers, 2, blocks, block_size, num_kv_heads, head_dim]


@dataclass(frozen=True)
class IpcBlocks:
    """A CUDA IPC fetch: the prefill worker's cache tensor and the handle's blocks from
    `block_start` on (their ids in that cache)."""

    tensor: kv_transports.SharedTensor
    block_start: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class KVSource:
    """Where a decode worker fetches a prompt's KV (GenerateRequest.kv_source)."""

    handle_id: str
    address: str
    num_tokens: int
    fingerprint: str


@dataclass(frozen=True)
class KVReservation:
    """What the decode worker reserved for a prompt whose KV it fetches."""

    skip_tokens: int  # prompt tokens the decode worker's own prefix cache holds (whole blocks)
    num_blocks: int  # blocks of the prompt


class KVReceiver(Protocol):
    """The engine's side of a fetch (services/worker/engine.py); each runs on the engine thread."""

    def fetch_reservation(self, request_id: str) -> KVReservation | None: ...

    def write_fetched_kv(self, request_id: str, span: Span, tensor: torch.Tensor) -> bool: ...

    def kv_fetched(self, request_id: str) -> None: ...

    def kv_fetch_failed(self, request_id: str) -> None: ...


# ---- the prefill side: reading chunks ------------------------------------------------------------


def chunk_plan(
    num_layers: int, num_blocks: int, first_block: int, layer_block_bytes: int, target_bytes: int
) -> list[tuple[int, int, int, int]]:
    """(layer_start, layer_end, block_start, block_end) of each chunk for blocks [first_block,
    num_blocks): whole-layer-range chunks of about `target_bytes`, split by layers when one block
    over all layers is already bigger. `layer_block_bytes` is one block of one layer (K and V)."""
    if first_block >= num_blocks:
        return []
    per_block = layer_block_bytes * num_layers
    if per_block <= target_bytes:
        step = max(1, target_bytes // per_block)
        return [(0, num_layers, b, min(b + step, num_blocks)) for b in range(first_block, num_blocks, step)]
    layers_per_chunk = max(1, target_bytes // layer_block_bytes)
    return [
        (lo, min(lo + layers_per_chunk, num_layers), b, b + 1)
        for b in range(first_block, num_blocks)
        for lo in range(0, num_layers, layers_per_chunk)
    ]


def read_chunk(kv: torch.Tensor, block_ids: tuple[int, ...], span: Span) -> KVChunkData:
    """Copy kv[l0:l1, :, block_ids[b0:b1]] into a host buffer (pinned when `kv` is on a GPU) and
    view its bytes (no further copy). `kv` is the whole cache tensor [num_layers, 2, num_blocks,
    block_size, num_kv_heads, head_dim]."""
    l0, l1, b0, b1 = span
    part = kv_transports.gather_blocks(kv, block_ids[b0:b1], (l0, l1))
    if kv.device.type == "cpu":
        host = part.contiguous()  # a held block is not written meanwhile, so a view is safe
    else:
        host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        host.copy_(part)
    data = host.reshape(-1).view(torch.uint8).numpy().data
    return KVChunkData(l0, l1, b0, b1, data, KV_DTYPE_NAMES[kv.dtype], tuple(part.shape))


def read_group_chunk(cache: KVCache, block_ids: tuple[int, ...], span: Span) -> KVChunkData:
    """A parallel group's chunk, gathered from its ranks in the model's layout (kv_reshard.py);
    on rank 0's engine thread."""
    l0, l1, b0, b1 = span
    host = cache.read_blocks(l0, l1, block_ids[b0:b1])
    data = host.reshape(-1).view(torch.uint8).numpy().data
    return KVChunkData(l0, l1, b0, b1, data, KV_DTYPE_NAMES[host.dtype], tuple(host.shape))


T = TypeVar("T")


async def stream_chunks(
    cache: KVCache,
    block_ids: tuple[int, ...],
    first_block: int,
    target_bytes: int,
    encode: Callable[[KVChunkData], T],
    run: Callable[[Callable[[], KVChunkData]], Awaitable[KVChunkData]] | None = None,
) -> AsyncIterator[T]:
    """The chunks of a held prompt's blocks from `first_block` on, in the model's layout, read
    and `encode`d (into wire bytes) READ_AHEAD ahead: read from the tensor on a worker thread, or,
    given `run` (a parallel group: rank 0's engine thread, where the group's commands go), gathered
    from the group's ranks there. The blocks are held (kv_handles.py): nobody writes them meanwhile."""
    num_layers, _, _, block_size, num_kv_heads, head_dim = cache.model_shape
    layer_block_bytes = 2 * block_size * num_kv_heads * head_dim * cache.tensor.element_size()
    plan = chunk_plan(num_layers, len(block_ids), first_block, layer_block_bytes, target_bytes)
    pending: collections.deque[asyncio.Future[T]] = collections.deque()
    loop = asyncio.get_running_loop()

    async def produce(span: Span) -> T:
        if run is None:
            return await loop.run_in_executor(None, lambda: encode(read_chunk(cache.tensor, block_ids, span)))
        chunk = await run(lambda: read_group_chunk(cache, block_ids, span))
        return await loop.run_in_executor(None, encode, chunk)

    try:
        for span in plan:
            pending.append(asyncio.ensure_future(produce(span)))
            if len(pending) > READ_AHEAD:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for future in pending:
            future.cancel()


# ---- the decode side: receiving chunks -----------------------------------------------------------


def model_shape(kv: torch.Tensor | KVCache) -> tuple[int, ...]:
    """The cache's shape in the model's layout (a tensor: one rank's whole cache)."""
    return tuple(kv.model_shape if isinstance(kv, KVCache) else kv.shape)


def chunk_tensor(chunk: KVChunkData, kv: torch.Tensor | KVCache, reservation: KVReservation) -> torch.Tensor:
    """Check a received chunk against this worker's cache (in the model's layout) and the
    reservation; view it as a tensor [layers, 2, blocks, block_size, num_kv_heads, head_dim] (no copy)."""
    num_layers, _, _, block_size, num_kv_heads, head_dim = model_shape(kv)
    l0, l1, b0, b1 = chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end
    skip_blocks = reservation.skip_tokens // block_size
    if not (0 <= l0 < l1 <= num_layers and skip_blocks <= b0 < b1 <= reservation.num_blocks):
        raise ValueError(f"chunk layers [{l0}, {l1}) x blocks [{b0}, {b1}) out of range")
    if chunk.dtype != KV_DTYPE_NAMES[kv.dtype]:
        raise ValueError(f"chunk dtype {chunk.dtype} != cache dtype {KV_DTYPE_NAMES[kv.dtype]}")
    shape = (l1 - l0, 2, b1 - b0, block_size, num_kv_heads, head_dim)
    if tuple(chunk.shape) != shape or len(chunk.data) != math.prod(shape) * kv.dtype.itemsize:
        raise ValueError(f"chunk shape {tuple(chunk.shape)} ({len(chunk.data)} bytes) != expected {shape}")
    with warnings.catch_warnings():  # a read-only buffer: it is only ever copied from
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(chunk.data, dtype=torch.uint8)
    return flat.view(kv.dtype).view(shape)


FetchStream = Callable[[KVSource, int], AsyncIterator[KVChunkData | IpcBlocks]]


@dataclass(frozen=True)
class FetchStats:
    ok: bool
    num_bytes: int
    seconds: float
    skip_tokens: int
    error: str = ""
    transport: kv_transports.Transport = "grpc"


class FetchStalled(Exception):
    """No KV arrived for the stall timeout."""


async def _next_item(items: AsyncIterator[T], stall_timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(anext(items), stall_timeout_s)
    except TimeoutError:
        raise FetchStalled(f"no KV arrived for {stall_timeout_s:g} s (--kv-fetch-stall-timeout)") from None


def copy_ipc_blocks(
    engine: KVReceiver,
    kv: torch.Tensor,
    request_id: str,
    ipc: IpcBlocks,
    reservation: KVReservation,
    target_bytes: int,
) -> int:
    """Engine thread: copy a CUDA IPC fetch's blocks from the peer's cache tensor into the
    reservation, device to device, layer ranges of about `target_bytes` (bounds the temporary);
    waits for the copies (the peer frees the blocks once we close the stream). Returns the bytes."""
    remote = kv_transports.import_tensor(ipc.tensor)
    if remote.dtype != kv.dtype or remote.shape[0] != kv.shape[0] or remote.shape[3:] != kv.shape[3:]:
        raise ValueError(f"peer cache {tuple(remote.shape)} {remote.dtype} != this cache's layout {kv.dtype}")
    block_size = kv.shape[3]
    skip_blocks = reservation.skip_tokens // block_size
    if ipc.block_start != skip_blocks or ipc.block_start + len(ipc.block_ids) != reservation.num_blocks:
        raise ValueError(
            f"peer offered blocks [{ipc.block_start}, {ipc.block_start + len(ipc.block_ids)}), "
            f"expected [{skip_blocks}, {reservation.num_blocks})"
        )
    num_layers = kv.shape[0]
    layer_block_bytes = kv[0, :, 0].numel() * kv.element_size()
    num_bytes = 0
    for l0, l1, b0, b1 in chunk_plan(
        num_layers, reservation.num_blocks, skip_blocks, layer_block_bytes, target_bytes
    ):
        ids = ipc.block_ids[b0 - skip_blocks : b1 - skip_blocks]
        part = kv_transports.gather_blocks(remote, ids, (l0, l1))
        if not engine.write_fetched_kv(request_id, (l0, l1, b0, b1), part):
            break  # aborted meanwhile
        num_bytes += part.numel() * part.element_size()
    kv_transports.synchronize(kv.device)
    return num_bytes


async def receive(
    call: Callable[[Callable[[], object]], asyncio.Future[object]],
    engine: KVReceiver,
    kv: torch.Tensor | KVCache,
    request_id: str,
    source: KVSource,
    fetch: FetchStream,
    stall_timeout_s: float = 10.0,
    ipc_chunk_bytes: int = 64 << 20,
) -> FetchStats:
    """Decode side, after `Engine.add_fetching_request`: pull the KV, then tell the engine it
    arrived, or that the fetch failed (it computes the prompt itself). `call(fn)` runs fn on the
    engine thread; `kv` is the whole cache tensor (shape and dtype checks); `fetch(source,
    skip_tokens)` streams the chunks (or one IpcBlocks); a stream silent for `stall_timeout_s`
    fails the fetch. `kv` is the cache (or one rank's whole cache tensor): chunks come in the
    model's layout, which a parallel group's cache scatters to its ranks (kv_reshard.py)."""
    started = time.monotonic()
    reservation = await call(lambda: engine.fetch_reservation(request_id))
    if reservation is None:  # no room for it: it is already scheduled to compute the prompt
        return FetchStats(False, 0, 0.0, 0, "no free blocks; computing the prompt here")
    assert isinstance(reservation, KVReservation)
    shape = model_shape(kv)
    num_layers, block_size = shape[0], shape[3]
    skip_blocks = reservation.skip_tokens // block_size
    expected = num_layers * (reservation.num_blocks - skip_blocks)
    received = 0
    num_bytes = 0
    transport: kv_transports.Transport = "grpc"
    writes: collections.deque[asyncio.Future[object]] = collections.deque()
    # Fetched even when the local cache holds every block: the (empty) stream frees the handle.
    items = fetch(source, reservation.skip_tokens)
    try:
        while True:
            try:
                chunk = await _next_item(items, stall_timeout_s)
            except StopAsyncIteration:
                break
            if isinstance(chunk, IpcBlocks):
                transport = "cuda-ipc"
                tensor = kv.tensor if isinstance(kv, KVCache) else kv
                if tuple(tensor.shape) != shape:  # never offered by a group (kv_transports.supported)
                    raise ValueError("CUDA IPC into a parallel group's KV cache is not supported")
                copied = await call(
                    functools.partial(
                        copy_ipc_blocks, engine, tensor, request_id, chunk, reservation, ipc_chunk_bytes
                    )
                )
                assert isinstance(copied, int)
                num_bytes += copied
                received = expected
                break  # closing the stream (below) tells the peer it may free the blocks
            tensor = chunk_tensor(chunk, kv, reservation)
            span = (chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end)
            writes.append(call(functools.partial(engine.write_fetched_kv, request_id, span, tensor)))
            received += (span[1] - span[0]) * (span[3] - span[2])
            num_bytes += len(chunk.data)
            if len(writes) > WRITE_WINDOW:
                await writes.popleft()
        for pending in writes:
            await pending
        writes.clear()
        if received != expected:
            raise ValueError(f"received {received} of {expected} layer-blocks")
    except asyncio.CancelledError:
        raise  # the Generate was cancelled: its abort frees the blocks
    except Exception as exc:
        log.warning(
            "KV fetch of %s from %s failed (%s); computing the prompt here", request_id, source.address, exc
        )
        for pending in writes:  # no write may land after the blocks go back
            with contextlib.suppress(Exception):
                await pending
        await call(lambda: engine.kv_fetch_failed(request_id))
        return FetchStats(
            False, num_bytes, time.monotonic() - started, reservation.skip_tokens, str(exc), transport
        )
    finally:
        await _close(items)
    await call(lambda: engine.kv_fetched(request_id))
    seconds = time.monotonic() - started
    log.info(
        "fetched KV of %s over %s: %d bytes in %.2f ms (%.2f GB/s), %d prompt tokens from the local prefix cache",
        request_id,
        transport,
        num_bytes,
        seconds * 1e3,
        num_bytes / max(seconds, 1e-9) / 1e9,
        reservation.skip_tokens,
    )
    return FetchStats(True, num_bytes, seconds, reservation.skip_tokens, transport=transport)


async def _close(items: AsyncIterator[object]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
