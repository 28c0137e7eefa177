"""Disaggregated prefill/decode: KV handles on the prefill side, KV reception on the decode side.

    prefill worker                                         decode worker
    Prefill(prompt) ─ engine computes the prompt,           Generate(prompt, [first], kv_source)
      samples the first token; its blocks move to a          reserve(): blocks for the prompt, its own
      KV handle (KVHandleStore, TTL --kv-handle-ttl)          prefix cache first (skip_tokens)
                                              ◀── FetchKV(handle, skip_tokens, fingerprint) ──
    stream_chunks(): kv_cache[l0:l1, :, blocks[b0:b1]] ──▶   write(): into the reserved blocks
      as raw bytes, read ahead on a thread                    as they arrive (engine thread)
    release(): the handle's blocks back to the pool         commit(): computed, decode from [first]
      when the stream ends (or the TTL passes)                (any failure: fallback() computes the
                                                               prompt itself)

Everything that touches the BlockManager runs on the engine thread (through `AsyncEngine.call`).
Reading held blocks off that thread is safe: a held block has a reference, so nobody writes it
until `release`, and `release` only runs after the stream that reads it ended.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.worker.request import EngineRequest, SequenceStatus

if TYPE_CHECKING:
    from services.worker.block_manager import BlockManager
    from services.worker.engine import Engine

log = logging.getLogger(__name__)

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",  # --kv-cache-dtype fp8
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# Chunks read ahead of the one being sent: overlaps the device->host copy with the network.
READ_AHEAD = 2
# Writes in flight on the engine thread before the receiver waits for the oldest one.
WRITE_WINDOW = 4
# Expired handle ids remembered, so that a late fetch hears "expired" rather than "unknown".
EXPIRED_MEMORY = 4096


class KVHandleError(Exception):
    """A FetchKV / ReleaseKV problem; `code` is the gRPC status name (NOT_FOUND, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class HeldKV:
    """A prefilled prompt's KV kept for a decode worker."""

    handle_id: str
    request_id: str
    block_ids: tuple[int, ...]  # the prompt's blocks, in order; ceil(num_tokens / block_size)
    num_tokens: int  # prompt tokens whose KV the blocks hold
    expires_at: float  # time.monotonic()
    expires_at_ms: int  # unix time in milliseconds (what the handle says)
    fetching: bool = False


@dataclass(frozen=True)
class KVChunkData:
    """One FetchKV chunk: layers [layer_start, layer_end) x blocks [block_start, block_end)."""

    layer_start: int
    layer_end: int
    block_start: int  # index into the handle's block list (skipped blocks counted)
    block_end: int
    data: bytes  # raw little-endian, C-contiguous
    dtype: str  # "bfloat16", ...
    shape: tuple[int, ...]  # [layers, 2, blocks, block_size, num_kv_heads, head_dim]


@dataclass(frozen=True)
class KVSource:
    """Where a decode worker fetches a prompt's KV (GenerateRequest.kv_source)."""

    handle_id: str
    address: str
    num_tokens: int
    fingerprint: str


class KVHandleStore:
    """The prefill side's handles. Engine thread only (it references and frees blocks)."""

    def __init__(self, block_manager: BlockManager, ttl_s: float) -> None:
        self.bm = block_manager
        self.ttl_s = ttl_s
        self.handles: dict[str, HeldKV] = {}
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_expired = 0
        self.num_fetched = 0
        self.num_blocks_sent = 0  # blocks streamed (skipped ones not counted), for tests and stats

    def __len__(self) -> int:
        return len(self.handles)

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int) -> HeldKV:
        """Take over the references of a finished prefill's blocks."""
        handle = HeldKV(
            handle_id=uuid.uuid4().hex,
            request_id=request_id,
            block_ids=tuple(block_ids),
            num_tokens=num_tokens,
            expires_at=time.monotonic() + self.ttl_s,
            expires_at_ms=int((time.time() + self.ttl_s) * 1000),
        )
        self.handles[handle.handle_id] = handle
        return handle

    def take(self, handle_id: str) -> HeldKV:
        """Claim a handle for one fetch (a handle is fetched once)."""
        handle = self.handles.get(handle_id)
        if handle is None:
            if handle_id in self._expired:
                raise KVHandleError(
                    "NOT_FOUND", f"KV handle {handle_id!r} expired (--kv-handle-ttl {self.ttl_s:g}s)"
                )
            raise KVHandleError(
                "NOT_FOUND",
                f"KV handle {handle_id!r} is unknown to this worker (never issued, already fetched or released)",
            )
        if handle.fetching:
            raise KVHandleError("FAILED_PRECONDITION", f"KV handle {handle_id!r} is already being fetched")
        handle.fetching = True
        return handle

    def release(self, handle_id: str, num_blocks_sent: int = 0, only_idle: bool = False) -> bool:
        """Free a handle's blocks (after its fetch, on ReleaseKV); False when it did not exist.
        `only_idle` (ReleaseKV) leaves a handle alone while a fetch reads it: that fetch frees it."""
        handle = self.handles.get(handle_id)
        if handle is None or (only_idle and handle.fetching):
            return False
        del self.handles[handle_id]
        if handle.fetching:
            self.num_fetched += 1
            self.num_blocks_sent += num_blocks_sent
        for block in handle.block_ids:
            self.bm.release_block(block)
        return True

    def expire(self, now: float) -> int:
        """Free the handles whose TTL passed and nobody is fetching; returns how many."""
        stale = [h.handle_id for h in self.handles.values() if h.expires_at <= now and not h.fetching]
        for handle_id in stale:
            self.release(handle_id)
            self._expired[handle_id] = None
        while len(self._expired) > EXPIRED_MEMORY:
            self._expired.popitem(last=False)
        if stale:
            self.num_expired += len(stale)
            log.info("freed %d expired KV handle(s)", len(stale))
        return len(stale)


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


def read_chunk(kv: torch.Tensor, block_ids: tuple[int, ...], span: tuple[int, int, int, int]) -> KVChunkData:
    """Copy kv[l0:l1, :, block_ids[b0:b1]] to host bytes. `kv` is the whole cache tensor
    [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    l0, l1, b0, b1 = span
    ids = block_ids[b0:b1]
    if ids == tuple(range(ids[0], ids[0] + len(ids))):  # contiguous blocks: a plain slice
        part = kv[l0:l1, :, ids[0] : ids[0] + len(ids)]
    else:
        part = kv[l0:l1].index_select(2, torch.tensor(ids, device=kv.device))
    host = part.contiguous().cpu() if kv.device.type != "cpu" else part.contiguous()
    data = host.view(torch.uint8).numpy().tobytes()
    return KVChunkData(l0, l1, b0, b1, data, DTYPE_NAMES[kv.dtype], tuple(part.shape))


async def stream_chunks(
    kv: torch.Tensor, handle: HeldKV, first_block: int, target_bytes: int
) -> AsyncIterator[KVChunkData]:
    """The chunks of a handle from `first_block` on, read on a worker thread READ_AHEAD ahead."""
    num_layers = kv.shape[0]
    layer_block_bytes = kv[0, :, 0].numel() * kv.element_size()
    plan = chunk_plan(num_layers, len(handle.block_ids), first_block, layer_block_bytes, target_bytes)
    pending: collections.deque[asyncio.Future[KVChunkData]] = collections.deque()
    loop = asyncio.get_running_loop()
    spans = iter(plan)
    try:
        for span in spans:
            pending.append(loop.run_in_executor(None, read_chunk, kv, handle.block_ids, span))
            if len(pending) > READ_AHEAD:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for future in pending:
            future.cancel()


# ---- the decode side: receiving chunks -----------------------------------------------------------


def reserve(engine: Engine, req: EngineRequest) -> None:
    """Engine thread: accept a request whose prompt KV will be fetched. It gets blocks for the whole
    prompt (its own prefix cache first) and waits in `engine.fetching`; with too few free blocks
    it is simply scheduled to compute the prompt itself."""
    request = engine.add_request(req, schedule=False)
    seq = request.sequences[0]
    bm = engine.block_manager
    prompt_len = request.prompt_len
    cached = bm.find_cached_prefix(seq)[: prompt_len // bm.block_size]
    cached_tokens = len(cached) * bm.block_size
    if not bm.can_allocate(seq, prompt_len - cached_tokens, cached):
        engine.schedule_request(request)
        return
    bm.use_cached_prefix(seq, cached)
    bm.allocate(seq, prompt_len - cached_tokens)
    seq.status = SequenceStatus.FETCHING
    request.num_cached_prompt_tokens = cached_tokens
    bm.record_lookup(prompt_len, cached_tokens)
    engine.fetching[request.request_id] = request


@dataclass(frozen=True)
class Reservation:
    skip_tokens: int  # prompt tokens the decode worker's own prefix cache holds (whole blocks)
    num_blocks: int  # blocks of the prompt


def reservation_of(engine: Engine, request_id: str) -> Reservation | None:
    """Engine thread: what `reserve` set up for a request (None: it computes the prompt itself)."""
    request = engine.fetching.get(request_id)
    if request is None:
        return None
    seq = request.sequences[0]
    return Reservation(seq.num_computed_tokens, len(seq.block_ids))


def chunk_tensor(chunk: KVChunkData, kv: torch.Tensor, reservation: Reservation) -> torch.Tensor:
    """Check a received chunk against this worker's cache and the reservation; view it as a
    tensor [layers, 2, blocks, block_size, num_kv_heads, head_dim] (no copy)."""
    num_layers, _, _, block_size, num_kv_heads, head_dim = kv.shape
    l0, l1, b0, b1 = chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end
    skip_blocks = reservation.skip_tokens // block_size
    if not (0 <= l0 < l1 <= num_layers and skip_blocks <= b0 < b1 <= reservation.num_blocks):
        raise ValueError(f"chunk layers [{l0}, {l1}) x blocks [{b0}, {b1}) out of range")
    if chunk.dtype != DTYPE_NAMES[kv.dtype]:
        raise ValueError(f"chunk dtype {chunk.dtype} != cache dtype {DTYPE_NAMES[kv.dtype]}")
    shape = (l1 - l0, 2, b1 - b0, block_size, num_kv_heads, head_dim)
    if tuple(chunk.shape) != shape or len(chunk.data) != math.prod(shape) * kv.element_size():
        raise ValueError(f"chunk shape {tuple(chunk.shape)} ({len(chunk.data)} bytes) != expected {shape}")
    with warnings.catch_warnings():  # a read-only buffer: it is only ever copied from
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(chunk.data, dtype=torch.uint8)
    return flat.view(kv.dtype).view(shape)


def write(engine: Engine, request_id: str, span: tuple[int, int, int, int], tensor: torch.Tensor) -> bool:
    """Engine thread: copy a received chunk into the request's blocks; False when the request
    is gone (aborted meanwhile)."""
    request = engine.fetching.get(request_id)
    if request is None:
        return False
    l0, l1, b0, b1 = span
    kv = engine.kv_cache.tensor
    ids = request.sequences[0].block_ids[b0:b1]
    src = tensor.to(kv.device)  # synchronous from pageable memory: the chunk's bytes can go
    if ids == list(range(ids[0], ids[0] + len(ids))):
        kv[l0:l1, :, ids[0] : ids[0] + len(ids)] = src
    else:
        kv[l0:l1, :, torch.tensor(ids, device=kv.device)] = src
    return True


def commit(engine: Engine, request_id: str) -> None:
    """Engine thread: the whole prompt's KV is in place; schedule the request to decode."""
    request = engine.fetching.pop(request_id, None)
    if request is None:
        return
    seq = request.sequences[0]
    seq.num_computed_tokens = request.prompt_len
    seq.status = SequenceStatus.WAITING
    engine.block_manager.register_computed_blocks(seq)
    engine.schedule_request(request)


def fallback(engine: Engine, request_id: str) -> None:
    """Engine thread: the fetch failed; free the blocks and compute the prompt here."""
    request = engine.fetching.pop(request_id, None)
    if request is None:
        return
    seq = request.sequences[0]
    engine.block_manager.free_sequence(seq)
    seq.status = SequenceStatus.WAITING
    request.num_cached_prompt_tokens = None
    engine.schedule_request(request)


FetchStream = Callable[[KVSource, int], AsyncIterator[KVChunkData]]


@dataclass(frozen=True)
class FetchStats:
    ok: bool
    num_bytes: int
    seconds: float
    skip_tokens: int
    error: str = ""


async def receive(
    call: Callable[[Callable[[], object]], asyncio.Future[object]],
    engine: Engine,
    request_id: str,
    source: KVSource,
    fetch: FetchStream,
) -> FetchStats:
    """Decode side, after `reserve`: pull the KV and commit, or fall back to computing the prompt.
    `call(fn)` runs fn on the engine thread; `fetch(source, skip_tokens)` streams the chunks."""
    started = time.monotonic()
    reservation = await call(lambda: reservation_of(engine, request_id))
    if reservation is None:  # no room for it: it is already scheduled to compute the prompt
        return FetchStats(False, 0, 0.0, 0, "no free blocks; computing the prompt here")
    assert isinstance(reservation, Reservation)
    kv = engine.kv_cache.tensor
    num_layers = kv.shape[0]
    skip_blocks = reservation.skip_tokens // engine.config.block_size
    expected = num_layers * (reservation.num_blocks - skip_blocks)
    received = 0
    num_bytes = 0
    writes: collections.deque[asyncio.Future[object]] = collections.deque()
    try:
        # Fetched even when the local cache holds every block: the (empty) stream frees the handle.
        async for chunk in fetch(source, reservation.skip_tokens):
            tensor = chunk_tensor(chunk, kv, reservation)
            span = (chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end)
            writes.append(call(lambda span=span, tensor=tensor: write(engine, request_id, span, tensor)))  # type: ignore[misc]
            received += (span[1] - span[0]) * (span[3] - span[2])
            num_bytes += len(chunk.data)
            if len(writes) > WRITE_WINDOW:
                await writes.popleft()
        for pending in writes:
            await pending
        if received != expected:
            raise ValueError(f"received {received} of {expected} layer-blocks")
    except asyncio.CancelledError:
        raise  # the Generate was cancelled: its abort frees the blocks
    except Exception as exc:
        log.warning(
            "KV fetch of %s from %s failed (%s); computing the prompt here", request_id, source.address, exc
        )
        await call(lambda: fallback(engine, request_id))
        return FetchStats(False, num_bytes, time.monotonic() - started, reservation.skip_tokens, str(exc))
    await call(lambda: commit(engine, request_id))
    seconds = time.monotonic() - started
    log.info(
        "fetched KV of %s: %d bytes in %.2f ms (%.2f GB/s), %d prompt tokens from the local prefix cache",
        request_id,
        num_bytes,
        seconds * 1e3,
        num_bytes / max(seconds, 1e-9) / 1e9,
        reservation.skip_tokens,
    )
    return FetchStats(True, num_bytes, seconds, reservation.skip_tokens)
