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
`receive` copies device to device in one engine-thread call (`copy_ipc_blocks`: one kernel launch
on CUDA, `Engine.kv_fetched` while it runs, then the wait for it).

Layer-wise push (kv_layerwise.py): a handle issued when the prefill was admitted is streamed while
the prefill runs: `stream_chunks` sends each (layers, blocks) span as soon as the forward has
written it (`ready_spans`) and the stream ends with `PrefillDone`, the sampled first token, which
the decode worker takes as its first generated token and streams on arrival (`kv_first_token`),
before the rest of the fetch has landed.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from services.worker import kv_transports
from services.worker.kv_cache import KV_DTYPE_NAMES, KVCache
from services.worker.kv_layerwise import LayerProgress, LayerwiseFailed, Readiness, Span, wait_ready
from services.worker.kv_nixl import NixlEndpoint, NixlRemote
from services.worker.outputs import ChoiceOutput

log = logging.getLogger(__name__)

# Chunks read ahead of the one being sent: overlaps the device->host copy with the network.
READ_AHEAD = 2
# Writes in flight on the engine thread before the receiver waits for the oldest one.
WRITE_WINDOW = 4
# Layer-wise push: seconds a stream waiting for the prefill (queued, or computing a long chunk)
# goes without a message before it sends a keep-alive (an empty KVChunk), which the decode
# worker's stall timeout counts as progress.
KEEP_ALIVE_S = 1.0


class KeepAlive:
    """A layer-wise stream's keep-alive: the prefill is still on its way."""


KEEP_ALIVE = KeepAlive()


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
    slot: int = -1  # prefill side: the wire helper's serve slot `data` is in (-1: a buffer of its own)
    # decode side: frees the buffer `data` views once the chunk is written (a wire helper's slot)
    release: Callable[[], None] | None = None

    def release_buffer(self) -> None:
        if self.release is not None:
            self.release()


@dataclass(frozen=True)
class IpcBlocks:
    """A CUDA IPC fetch: the prefill worker's cache tensor and the handle's blocks from
    `block_start` on (their ids in that cache)."""

    tensor: kv_transports.SharedTensor
    block_start: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class NixlSpan:
    """A NIXL fetch's span, ready to be read out of the prefill worker's registered cache."""

    remote: NixlRemote  # its agent_metadata only in the first of a fetch
    span: Span
    block_ids: tuple[int, ...]  # the prefill worker's, for the span's blocks


@dataclass(frozen=True)
class KVSource:
    """Where a decode worker fetches a prompt's KV (GenerateRequest.kv_source)."""

    handle_id: str
    address: str
    num_tokens: int
    fingerprint: str
    layerwise: bool = False  # issued at admission: the first token comes at the end of the fetch


@dataclass(frozen=True)
class PrefillDone:
    """A layer-wise fetch's last message: the token the prefill sampled (with its logprobs when
    asked, and its finish reason when it already ended the choice: stop, length)."""

    choice: ChoiceOutput

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choice.token_ids

    @property
    def finished(self) -> bool:
        return self.choice.finish_reason is not None


@dataclass(frozen=True)
class KVReservation:
    """What the decode worker reserved for a prompt whose KV it fetches."""

    skip_tokens: int  # prompt tokens the decode worker's own prefix cache holds (whole blocks)
    num_blocks: int  # blocks of the prompt
    # one choice and no generated token given: a layer-wise fetch's first token is its first one
    wants_first: bool = False


class KVReceiver(Protocol):
    """The engine's side of a fetch (services/worker/engine.py); each runs on the engine thread."""

    def fetch_reservation(self, request_id: str) -> KVReservation | None: ...

    def write_fetched_kv(self, request_id: str, span: Span, tensor: torch.Tensor) -> bool: ...

    def copy_peer_kv(self, request_id: str, span: Span, remote: torch.Tensor, src_ids: list[int]) -> bool: ...

    def kv_first_token(self, request_id: str, first: ChoiceOutput) -> bool: ...

    def kv_fetched(self, request_id: str) -> None: ...

    def kv_fetch_failed(self, request_id: str) -> None: ...

    def pin_fetch_blocks(self, request_id: str) -> tuple[int, ...] | None: ...

    def unpin_blocks(self, blocks: tuple[int, ...]) -> None: ...


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


def ready_spans(
    sent: list[int], ready: tuple[int, ...], layer_block_bytes: int, target_bytes: int
) -> list[Span]:
    """Layer-wise push: the spans to send next. For each run of consecutive layers with equal
    (sent, ready) block counts, blocks [sent, ready) of those layers, cut as `chunk_plan` cuts a
    whole prompt (which this equals when everything is ready at once). Advances `sent`."""
    spans: list[Span] = []
    layer, num_layers = 0, len(sent)
    while layer < num_layers:
        lo, hi = sent[layer], ready[layer]
        if hi <= lo:
            layer += 1
            continue
        end = layer + 1
        while end < num_layers and sent[end] == lo and ready[end] == hi:
            end += 1
        for l0, l1, b0, b1 in chunk_plan(end - layer, hi, lo, layer_block_bytes, target_bytes):
            spans.append((layer + l0, layer + l1, b0, b1))
        sent[layer:end] = [hi] * (end - layer)
        layer = end
    return spans


@functools.cache
def _reader_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def read_chunk(
    kv: torch.Tensor,
    block_ids: tuple[int, ...],
    span: Span,
    ready_event: Any = None,
    out: torch.Tensor | None = None,
) -> KVChunkData:
    """Copy kv[l0:l1, :, block_ids[b0:b1]] into a host buffer (pinned when `kv` is on a GPU), or
    into the start of `out` (uint8, big enough: a wire helper's slot), and view its bytes (no
    further copy). `kv` is the whole cache tensor [num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]. On CUDA the copy runs on a side stream, after `ready_event` (a
    layer-wise prefill's writes; the forward goes on meanwhile)."""
    l0, l1, b0, b1 = span
    if kv.device.type == "cpu":
        part = kv_transports.gather_blocks(kv, block_ids[b0:b1], (l0, l1))
        if out is None:
            host = part.contiguous()  # a held block is not written meanwhile, so a view is safe
        else:
            host = _view_in(out, part)
            host.copy_(part)
    else:
        stream = _reader_stream(kv.device)
        with torch.cuda.stream(stream):
            wait_ready(ready_event)
            part = kv_transports.gather_blocks(kv, block_ids[b0:b1], (l0, l1))
            if out is None:
                host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
            else:
                host = _view_in(out, part)
            host.copy_(part, non_blocking=True)
        stream.synchronize()
    data = host.reshape(-1).view(torch.uint8).numpy().data
    return KVChunkData(l0, l1, b0, b1, data, KV_DTYPE_NAMES[kv.dtype], tuple(part.shape))


def _view_in(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of the uint8 buffer `out` as a tensor of `like`'s dtype and shape."""
    nbytes = like.numel() * like.element_size()
    if nbytes > out.numel():
        raise ValueError(f"a {nbytes}-byte chunk does not fit a {out.numel()}-byte buffer")
    return out[:nbytes].view(like.dtype).view(like.shape)


def read_group_chunk(cache: KVCache, block_ids: tuple[int, ...], span: Span) -> KVChunkData:
    """A parallel group's chunk, gathered from its ranks in the model's layout (kv_reshard.py);
    on rank 0's engine thread."""
    l0, l1, b0, b1 = span
    host = cache.read_blocks(l0, l1, block_ids[b0:b1])
    data = host.reshape(-1).view(torch.uint8).numpy().data
    return KVChunkData(l0, l1, b0, b1, data, KV_DTYPE_NAMES[host.dtype], tuple(host.shape))


T = TypeVar("T")


def block_bytes_per_layer(cache: KVCache) -> int:
    """Bytes of one block of one layer (K and V) in the model's layout: the unit chunks are cut
    in (`chunk_plan`), and the biggest chunk when one block over all layers exceeds the target."""
    _, _, _, block_size, num_kv_heads, head_dim = cache.model_shape
    return 2 * block_size * num_kv_heads * head_dim * cache.tensor.element_size()


async def stream_chunks(
    cache: KVCache,
    block_ids: tuple[int, ...],
    first_block: int,
    target_bytes: int,
    encode: Callable[[KVChunkData], T],
    progress: LayerProgress | None = None,
    run: Callable[[Callable[[], KVChunkData]], Awaitable[KVChunkData]] | None = None,
    layers: tuple[int, int] | None = None,
    read_into: Callable[[Callable[[torch.Tensor], KVChunkData]], Awaitable[KVChunkData]] | None = None,
) -> AsyncIterator[T | KeepAlive]:
    """The chunks of a held prompt's blocks from `first_block` on, in the model's layout, read
    and `encode`d (into wire bytes) READ_AHEAD ahead: read from the tensor on a worker thread, or,
    given `run` (a parallel group: rank 0's engine thread, where the group's commands go), gathered
    from the group's ranks there. The blocks are held (kv_handles.py): nobody writes them
    meanwhile. With a layer-wise handle's `progress` (a single-rank worker), each span goes as soon
    as the prefill has written it, until the prefill completes (LayerwiseFailed when it fails).
    `layers` [start, end): only those (one stream of a parallel fetch, kv_streams.py). With
    `read_into` (a single-rank worker's stream served by a wire helper, kv_wire_helpers.py), each
    chunk is read by `read_into(read)`, which runs `read(out)` into a buffer of its own."""
    num_layers = cache.model_shape[0]
    block_bytes = block_bytes_per_layer(cache)
    lo, hi = layers if layers is not None else (0, num_layers)
    pending: collections.deque[asyncio.Future[T]] = collections.deque()
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    sent = [first_block] * (hi - lo)
    unsubscribe = progress.listen(lambda: loop.call_soon_threadsafe(changed.set)) if progress else None

    async def produce(span: Span, ids: tuple[int, ...], event: Any) -> T:
        if read_into is not None:
            return encode(await read_into(lambda out: read_chunk(cache.tensor, ids, span, event, out)))
        if run is None:
            return await loop.run_in_executor(
                None, lambda: encode(read_chunk(cache.tensor, ids, span, event))
            )
        chunk = await run(lambda: read_group_chunk(cache, ids, span))
        return await loop.run_in_executor(None, encode, chunk)

    try:
        while True:
            changed.clear()  # before the snapshot: a change after it wakes the wait below
            snap = progress.snapshot() if progress is not None else _all_ready(num_layers, block_ids)
            if snap.error:
                raise LayerwiseFailed(snap.error)
            for l0, l1, b0, b1 in ready_spans(sent, snap.ready_blocks[lo:hi], block_bytes, target_bytes):
                span = (lo + l0, lo + l1, b0, b1)
                pending.append(asyncio.ensure_future(produce(span, snap.block_ids, snap.event)))
                if len(pending) > READ_AHEAD:
                    yield await pending.popleft()
            if snap.complete:
                break
            if pending:
                yield await pending.popleft()
            elif not await _changed_within(changed, KEEP_ALIVE_S):
                yield KEEP_ALIVE
        while pending:
            yield await pending.popleft()
    finally:
        for future in pending:
            future.cancel()
        if unsubscribe is not None:
            unsubscribe()


async def ready_span_batches(
    kv: torch.Tensor,
    block_ids: tuple[int, ...],
    first_block: int,
    target_bytes: int,
    progress: LayerProgress | None = None,
) -> AsyncIterator[tuple[list[Span], Readiness] | KeepAlive]:
    """The spans of a held prompt's blocks from `first_block` on, in batches as they become ready
    (all at once for a finished prefill), each with the snapshot it was cut from; on CUDA after
    the writes it covers are done (a NIXL reader reads the memory outside this worker's streams).
    Ends once the prefill completed and everything went; LayerwiseFailed when it fails."""
    num_layers = kv.shape[0]
    layer_block_bytes = kv[0, :, 0].numel() * kv.element_size()
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    sent = [first_block] * num_layers
    unsubscribe = progress.listen(lambda: loop.call_soon_threadsafe(changed.set)) if progress else None
    try:
        while True:
            changed.clear()
            snap = progress.snapshot() if progress is not None else _all_ready(num_layers, block_ids)
            if snap.error:
                raise LayerwiseFailed(snap.error)
            spans = ready_spans(sent, snap.ready_blocks, layer_block_bytes, target_bytes)
            if spans:
                if snap.event is not None:
                    await loop.run_in_executor(None, snap.event.synchronize)
                yield spans, snap
            if snap.complete:
                return
            if not spans and not await _changed_within(changed, KEEP_ALIVE_S):
                yield KEEP_ALIVE
    finally:
        if unsubscribe is not None:
            unsubscribe()


def _all_ready(num_layers: int, block_ids: tuple[int, ...]) -> Readiness:
    """A finished prefill's handle: every block of every layer is there."""
    return Readiness((len(block_ids),) * num_layers, block_ids, None, True, None, "")


async def wait_complete(progress: LayerProgress) -> AsyncIterator[Readiness | KeepAlive]:
    """A layer-wise handle once its prefill completed (transports that move the whole prompt at
    once), keep-alives before; LayerwiseFailed when it fails."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    # (only the end: per-layer wake-ups would cost the prefill's launching thread the GIL)
    unsubscribe = progress.listen(lambda: loop.call_soon_threadsafe(changed.set), per_layer=False)
    try:
        while True:
            changed.clear()
            snap = progress.snapshot()
            if snap.error:
                raise LayerwiseFailed(snap.error)
            if snap.complete:
                yield snap
                return
            if not await _changed_within(changed, KEEP_ALIVE_S):
                yield KEEP_ALIVE
    finally:
        unsubscribe()


async def _changed_within(changed: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(changed.wait(), seconds)
    except TimeoutError:
        return False
    return True


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


@functools.cache
def _writer_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def stage_on_device(chunk: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Off the engine thread: a received chunk (a view of the bytes gRPC handed over) copied to
    `device` through pinned memory on a side stream (torch's pinned allocator reuses the staging
    buffers), so that the engine thread's write is a device-side copy, not a synchronous copy from
    pageable memory that would hold up its steps. KVCache.write_blocks records the result's use
    on the engine's stream."""
    stream = _writer_stream(device)
    with torch.cuda.stream(stream):
        if chunk.is_pinned():  # a wire helper's slot (its ring is page-locked): straight to the device
            staged = chunk.to(device, non_blocking=True)
        else:
            host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
            host.copy_(chunk)
            staged = host.to(device, non_blocking=True)
    stream.synchronize()
    return staged


def staging_device(kv: torch.Tensor | KVCache) -> torch.device | None:
    """Where received chunks are staged before the engine writes them: a single rank's CUDA cache
    (a parallel group's rank 0 scatters host chunks to its ranks itself)."""
    tensor = kv.tensor if isinstance(kv, KVCache) else kv
    if tensor.device.type != "cuda" or tuple(tensor.shape) != model_shape(kv):
        return None
    return tensor.device


async def _stage_and_write(
    call: Callable[[Callable[[], object]], asyncio.Future[object]],
    engine: KVReceiver,
    request_id: str,
    span: Span,
    tensor: torch.Tensor,
    device: torch.device,
) -> object:
    staged = await asyncio.get_running_loop().run_in_executor(None, stage_on_device, tensor, device)
    return await call(functools.partial(engine.write_fetched_kv, request_id, span, staged))


FetchStream = Callable[
    [KVSource, int], AsyncIterator[KVChunkData | IpcBlocks | NixlSpan | PrefillDone | KeepAlive]
]


@dataclass(frozen=True)
class FetchStats:
    ok: bool
    num_bytes: int
    seconds: float
    skip_tokens: int
    error: str = ""
    transport: kv_transports.Transport = "grpc"
    # a layer-wise fetch: the prefill's first token (None otherwise, and when the fetch failed)
    first: PrefillDone | None = None
    copy_seconds: float = 0.0  # CUDA IPC: the engine thread's copy call (copy_ipc_blocks; in `seconds`)


class FetchStalled(Exception):
    """No KV arrived for the stall timeout."""


async def _next_item(items: AsyncIterator[T], stall_timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(anext(items), stall_timeout_s)
    except TimeoutError:
        raise FetchStalled(f"no KV arrived for {stall_timeout_s:g} s (--kv-fetch-stall-timeout)") from None


def ipc_copy_spans(
    kv_shape: Sequence[int],
    layer_block_bytes: int,
    ipc: IpcBlocks,
    reservation: KVReservation,
    target_bytes: int,
    one_launch: bool,
) -> list[tuple[Span, list[int]]]:
    """The copies of a CUDA IPC fetch, each (span, the peer's block ids for its blocks): with
    `one_launch` (a CUDA cache: kernels/triton/kv_block_copy.py needs no temporary) one span of
    every layer and block, else spans of about `target_bytes` (`chunk_plan`; bounds a CPU
    cache's scattered copy's temporary). Raises ValueError when the peer's blocks are not the
    reservation's [skip, num_blocks)."""
    num_layers, block_size = kv_shape[0], kv_shape[3]
    skip_blocks = reservation.skip_tokens // block_size
    if ipc.block_start != skip_blocks or ipc.block_start + len(ipc.block_ids) != reservation.num_blocks:
        raise ValueError(
            f"peer offered blocks [{ipc.block_start}, {ipc.block_start + len(ipc.block_ids)}), "
            f"expected [{skip_blocks}, {reservation.num_blocks})"
        )
    if one_launch:
        target_bytes = max(target_bytes, num_layers * reservation.num_blocks * layer_block_bytes)
    return [
        ((l0, l1, b0, b1), list(ipc.block_ids[b0 - skip_blocks : b1 - skip_blocks]))
        for l0, l1, b0, b1 in chunk_plan(
            num_layers, reservation.num_blocks, skip_blocks, layer_block_bytes, target_bytes
        )
    ]


@dataclass(frozen=True)
class IpcCopied:
    """What `copy_ipc_blocks` did: the bytes copied (none when the request was gone), when each of
    its stages ended on the engine thread (time.monotonic(): "on engine" its start, "mapped" the
    peer's tensor found and the copy planned, "launched" the copies enqueued, "handed over"
    `kv_fetched` done, "synced" the copies done), and on CUDA the copy's time on the device
    (CUDA events from "mapped" to "launched": with the host's launch work, which the device
    waits for), else 0."""

    num_bytes: int
    moments: dict[str, float]
    device_seconds: float


def copy_ipc_blocks(
    engine: KVReceiver,
    kv: torch.Tensor,
    request_id: str,
    ipc: IpcBlocks,
    reservation: KVReservation,
    target_bytes: int,
) -> IpcCopied:
    """Engine thread: copy a CUDA IPC fetch's blocks from the peer's cache tensor into the
    reservation, device to device (KVCache.copy_blocks_from; `ipc_copy_spans`: on CUDA all of
    them in one kernel launch), and hand the request to the scheduler (`kv_fetched`) in the same
    call, so that its decode starts in this wake of the engine thread, not one hop later. On
    CUDA the copy runs on the engine's stream, behind a step in flight and ahead of every later
    step, so `kv_fetched` (the blocks' prefix-cache hashing, host work) runs while the device
    copies; then the call waits for the copy, which must be done before it returns: the peer
    frees its blocks once the stream closes, and an abort may hand ours to another request."""
    moments = {"on engine": time.monotonic()}
    remote = kv_transports.import_tensor(ipc.tensor)
    if remote.dtype != kv.dtype or remote.shape[0] != kv.shape[0] or remote.shape[3:] != kv.shape[3:]:
        raise ValueError(f"peer cache {tuple(remote.shape)} {remote.dtype} != this cache's layout {kv.dtype}")
    layer_block_bytes = kv[0, :, 0].numel() * kv.element_size()
    spans = ipc_copy_spans(kv.shape, layer_block_bytes, ipc, reservation, target_bytes, kv.is_cuda)
    num_bytes = 0
    events = None
    if kv.is_cuda:  # (on the engine's stream: no device-wide wait)
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
    moments["mapped"] = time.monotonic()  # (to "launched": the host's share of the device time)
    aborted = ended = False
    try:
        for (l0, l1, b0, b1), src_ids in spans:
            if not engine.copy_peer_kv(request_id, (l0, l1, b0, b1), remote, src_ids):
                aborted = True  # the request is gone (aborted meanwhile): nothing to hand over
                break
            num_bytes += (l1 - l0) * (b1 - b0) * layer_block_bytes
        if events is not None:
            events[1].record()
            ended = True
        moments["launched"] = time.monotonic()
        if not aborted:
            engine.kv_fetched(request_id)
        moments["handed over"] = time.monotonic()
    finally:  # (also when it failed: nothing may still read the peer's blocks or write ours)
        if events is not None:
            if not ended:  # (a launch failed: after whatever it enqueued)
                events[1].record()
            events[1].synchronize()
        moments["synced"] = time.monotonic()
    device_seconds = events[0].elapsed_time(events[1]) / 1e3 if events is not None else 0.0
    return IpcCopied(num_bytes, moments, device_seconds)


async def receive(
    call: Callable[[Callable[[], object]], asyncio.Future[object]],
    engine: KVReceiver,
    kv: torch.Tensor | KVCache,
    request_id: str,
    source: KVSource,
    fetch: FetchStream,
    stall_timeout_s: float = 10.0,
    ipc_chunk_bytes: int = 64 << 20,
    nixl: NixlEndpoint | None = None,
) -> FetchStats:
    """Decode side, after `Engine.add_fetching_request`: pull the KV, then tell the engine it
    arrived, or that the fetch failed (it computes the prompt itself). `call(fn)` runs fn on the
    engine thread; `kv` is the whole cache tensor (shape and dtype checks); `fetch(source,
    skip_tokens)` streams the chunks (or one IpcBlocks, or NixlSpans read with `nixl`, this
    worker's endpoint); a stream silent for `stall_timeout_s` fails the fetch. `kv` is the cache
    (or one rank's whole cache tensor): chunks come in the model's layout, which a parallel
    group's cache scatters to its ranks (kv_reshard.py)."""
    started = time.monotonic()
    reservation = await call(lambda: engine.fetch_reservation(request_id))
    # when each stage ended, from `started` (the log line's breakdown: where a fetch's time goes):
    # reserved, first item (the FetchKV's first message), for CUDA IPC the engine thread's stages
    # (IpcCopied) and copied (back here), closed (the stream: the peer frees its blocks)
    moments: dict[str, float] = {"reserved": time.monotonic()}
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
    copy_seconds = 0.0  # CUDA IPC: the engine thread's copy call, from its start to the copy's end
    copy_device_seconds = 0.0  # ... the copy's own time on the device (CUDA events)
    done: PrefillDone | None = None
    first_taken = False  # the engine took the prefill's token as the request's first output
    fetched = False  # the engine has the whole prompt (a CUDA IPC copy says so itself)
    nixl_reads = _NixlReads(call, engine, request_id, nixl)
    writes: collections.deque[asyncio.Future[object]] = collections.deque()
    device = staging_device(kv)
    # Fetched even when the local cache holds every block: the (empty) stream frees the handle.
    items = fetch(source, reservation.skip_tokens)
    try:
        while True:
            try:
                chunk = await _next_item(items, stall_timeout_s)
            except StopAsyncIteration:
                break
            if isinstance(chunk, KeepAlive):
                continue
            moments.setdefault("first item", time.monotonic())
            if isinstance(chunk, PrefillDone):
                done = chunk
                if reservation.wants_first:
                    # The client gets the token now, not after the KV still on its way (writes in
                    # flight, the CUDA IPC copy, NIXL reads) and the fetch's end.
                    taken = await call(functools.partial(engine.kv_first_token, request_id, chunk.choice))
                    first_taken = taken is True
                if done.finished:  # its first token ended the choice: no KV is needed
                    break
            elif isinstance(chunk, NixlSpan):
                transport = "nixl"
                num_bytes += await nixl_reads.read(chunk, reservation)
                received += (chunk.span[1] - chunk.span[0]) * (chunk.span[3] - chunk.span[2])
            if transport == "nixl" and received == expected and (done is not None or not source.layerwise):
                break  # every span read: closing the stream (below) lets the peer free the blocks
            if isinstance(chunk, PrefillDone | NixlSpan):
                continue
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
                moments_back = time.monotonic()
                assert isinstance(copied, IpcCopied)
                num_bytes += copied.num_bytes
                copy_seconds = copied.moments["synced"] - copied.moments["on engine"]
                copy_device_seconds = copied.device_seconds
                fetched = True
                moments.update(copied.moments)  # (the engine thread's stages, on the same clock)
                moments["copied"] = moments_back
                received = expected
                break  # closing the stream (below) tells the peer it may free the blocks
            try:
                tensor = chunk_tensor(chunk, kv, reservation)
            except Exception:
                chunk.release_buffer()
                raise
            span = (chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end)
            if device is None:
                write = call(functools.partial(engine.write_fetched_kv, request_id, span, tensor))
            else:  # staged off the engine thread first
                write = asyncio.ensure_future(
                    _stage_and_write(call, engine, request_id, span, tensor, device)
                )
            if chunk.release is not None:  # its buffer is free once the write is done (or failed)
                write.add_done_callback(functools.partial(_release_after, chunk.release))
            writes.append(write)
            received += (span[1] - span[0]) * (span[3] - span[2])
            num_bytes += len(chunk.data)
            if len(writes) > WRITE_WINDOW:
                await writes.popleft()
        for pending in writes:
            await pending
        writes.clear()
        if source.layerwise and done is None:
            raise ValueError("the layer-wise stream ended without the prefill's first token")
        if done is not None and done.finished:
            if not first_taken:  # (several choices: each samples its own here)
                raise ValueError("the prefill's first token ended it; computing the prompt here")
            # the engine ended the request with that token; its reserved blocks went with it
            return FetchStats(
                True, num_bytes, time.monotonic() - started, reservation.skip_tokens, "", transport, done
            )
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
        await nixl_reads.close()  # (before the stream: the peer frees the blocks when it closes)
        await _close(items)
        moments["closed"] = time.monotonic()
    if not fetched:
        await call(lambda: engine.kv_fetched(request_id))
    seconds = time.monotonic() - started
    log.info(
        "fetched KV of %s over %s%s: %d bytes in %.2f ms (%.2f GB/s), %d prompt tokens from the local prefix cache%s"
        " (ms from the start: %s)",
        request_id,
        transport,
        " (layer-wise, from the prefill's admission)" if source.layerwise else "",
        num_bytes,
        seconds * 1e3,
        num_bytes / max(seconds, 1e-9) / 1e9,
        reservation.skip_tokens,
        f"; the copy call {copy_seconds * 1e3:.3f} ms ({num_bytes / max(copy_seconds, 1e-9) / 1e9:.1f} GB/s"
        f"; on the device {copy_device_seconds * 1e3:.3f} ms)"
        if copy_seconds
        else "",
        ", ".join(f"{name} {(at - started) * 1e3:.2f}" for name, at in moments.items()),
    )
    return FetchStats(
        True,
        num_bytes,
        seconds,
        reservation.skip_tokens,
        transport=transport,
        first=done,
        copy_seconds=copy_seconds,
    )


def _release_after(release: Callable[[], None], _: object) -> None:
    release()


class _NixlReads:
    """A fetch's NIXL reads: into its reserved blocks, pinned while a read may still be writing
    them (an abort meanwhile must not hand them to another request), one read at a time."""

    def __init__(
        self,
        call: Callable[[Callable[[], object]], asyncio.Future[object]],
        engine: KVReceiver,
        request_id: str,
        endpoint: NixlEndpoint | None,
    ) -> None:
        self.call, self.engine, self.request_id, self.endpoint = call, engine, request_id, endpoint
        self.remote: NixlRemote | None = None
        self.blocks: tuple[int, ...] | None = None
        self.inflight: asyncio.Future[int] | None = None

    async def read(self, chunk: NixlSpan, reservation: KVReservation) -> int:
        if self.endpoint is None:
            raise ValueError("the peer sent NIXL spans but this worker has no NIXL agent")
        if self.remote is None:
            if not chunk.remote.agent_metadata:
                raise ValueError("the first NIXL span carries no agent metadata")
            self.remote = chunk.remote
        if self.blocks is None:
            blocks = await self.call(lambda: self.engine.pin_fetch_blocks(self.request_id))
            if blocks is None:
                raise ValueError("the request ended during its fetch")
            assert isinstance(blocks, tuple)
            self.blocks = blocks
        l0, l1, b0, b1 = chunk.span
        block_size = self.endpoint.kv.shape[3]
        num_layers = self.endpoint.kv.shape[0]
        skip_blocks = reservation.skip_tokens // block_size
        if not (0 <= l0 < l1 <= num_layers and skip_blocks <= b0 < b1 <= reservation.num_blocks):
            raise ValueError(f"NIXL span layers [{l0}, {l1}) x blocks [{b0}, {b1}) out of range")
        if len(chunk.block_ids) != b1 - b0:
            raise ValueError(f"NIXL span of {b1 - b0} blocks names {len(chunk.block_ids)}")
        loop = asyncio.get_running_loop()
        self.inflight = loop.run_in_executor(
            None, self.endpoint.read, self.remote, (l0, l1), chunk.block_ids, self.blocks[b0:b1]
        )
        return await asyncio.shield(self.inflight)

    async def close(self) -> None:
        """After the last read (failed, cancelled or done): unpin the blocks once nothing writes them."""
        if self.inflight is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self.inflight)
        if self.blocks is not None:
            blocks = self.blocks
            self.blocks = None
            await self.call(lambda: self.engine.unpin_blocks(blocks))


async def _close(items: AsyncIterator[object]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
