"""The prefill side's KV handles: a finished prefill's prompt blocks, kept for a decode worker.

    Prefill(prompt) -> the engine computes the prompt and samples the first token; its blocks move
    to a handle (`hold`) -> a decode worker's FetchKV claims it (`take`) and streams it
    (kv_transfer.py) -> `release` gives the blocks back when the stream ends, on ReleaseKV, or
    when the TTL (--kv-handle-ttl) passes with nobody fetching (`expire`).

A layer-wise handle (kv_layerwise.py) is opened when its prefill is admitted (`open`), before any
block exists: it pins each of the prompt's blocks as the scheduler allocates them (`adopt`),
so that they stay valid for its reader even if the prefill is preempted or aborted meanwhile
(the handle then fails, `fail`), and it is completed with the sampled first token (`complete`).

Engine thread only (it references and frees blocks), except `take`, which a FetchKV calls from the
event loop (under the lock: the engine thread may be busy in a forward that the fetch is waiting
for). Reading a held block off that thread is safe: a held block has a reference, so nobody
writes it until `release`, and `release` only runs after the stream that reads it ended.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.worker.block_manager import BlockManager
    from services.worker.kv_layerwise import LayerProgress

log = logging.getLogger(__name__)

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
    # Layer-wise push: how far the prefill has written the KV (None: a finished prefill's handle)
    progress: LayerProgress | None = None


class KVHandleStore:
    """The prefill side's handles. Engine thread only (it references and frees blocks)."""

    def __init__(self, block_manager: BlockManager, ttl_s: float) -> None:
        self.bm = block_manager
        self.ttl_s = ttl_s
        self.handles: dict[str, HeldKV] = {}
        # Handles gone without a fetch (expired, or a layer-wise prefill that failed), by id: why
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
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
        with self._lock:
            self.handles[handle.handle_id] = handle
        return handle

    # ---- layer-wise handles (kv_layerwise.py) ----------------------------------------------------
    def open(self, handle_id: str, request_id: str, num_tokens: int, progress: LayerProgress) -> HeldKV:
        """A handle for a prefill just admitted: no blocks yet, and no expiry until it completes
        (the decode worker's fetch is normally open long before)."""
        handle = HeldKV(
            handle_id=handle_id,
            request_id=request_id,
            block_ids=(),
            num_tokens=num_tokens,
            expires_at=math.inf,
            expires_at_ms=int((time.time() + self.ttl_s) * 1000),
            progress=progress,
        )
        with self._lock:
            if handle_id in self.handles or handle_id in self._gone:
                raise KVHandleError("ALREADY_EXISTS", f"KV handle {handle_id!r} exists already")
            self.handles[handle_id] = handle
        return handle

    def adopt(self, handle: HeldKV, block_ids: list[int]) -> None:
        """Pin the prompt's blocks the handle does not hold yet (they were just allocated)."""
        assert handle.progress is not None
        new = handle.progress.adopt(block_ids)
        for block in new:
            self.bm.pin_block(block)
        handle.block_ids += tuple(new)

    def complete(self, handle: HeldKV, first: object) -> None:
        """The prefill finished: every block is written; the TTL starts now."""
        assert handle.progress is not None
        handle.expires_at = time.monotonic() + self.ttl_s
        handle.expires_at_ms = int((time.time() + self.ttl_s) * 1000)
        handle.progress.complete(first)

    def fail(self, handle: HeldKV, reason: str) -> None:
        """The prefill ended without its KV: its reader stops with `reason`; an idle handle goes
        now (a fetch in progress releases it when its stream ends)."""
        assert handle.progress is not None
        handle.progress.fail(reason)
        if self.release(handle.handle_id, only_idle=True):
            self._forget(handle.handle_id, f"KV handle {handle.handle_id!r}: {reason}")

    def take(self, handle_id: str) -> HeldKV:
        """Claim a handle for one fetch (a handle is fetched once). Any thread."""
        with self._lock:
            handle = self.handles.get(handle_id)
            if handle is None:
                gone = self._gone.get(handle_id)
                if gone is not None:
                    raise KVHandleError("NOT_FOUND", gone)
                raise KVHandleError(
                    "NOT_FOUND",
                    f"KV handle {handle_id!r} is unknown to this worker (never issued, already fetched or released)",
                )
            if handle.fetching:
                raise KVHandleError(
                    "FAILED_PRECONDITION", f"KV handle {handle_id!r} is already being fetched"
                )
            handle.fetching = True
            return handle

    def release(self, handle_id: str, num_blocks_sent: int = 0, only_idle: bool = False) -> bool:
        """Free a handle's blocks (after its fetch, on ReleaseKV); False when it did not exist.
        `only_idle` (ReleaseKV) leaves a handle alone while a fetch reads it: that fetch frees it."""
        with self._lock:
            handle = self.handles.get(handle_id)
            if handle is None or (only_idle and handle.fetching):
                return False
            del self.handles[handle_id]
        if handle.progress is not None:  # a prefill still running stops adding blocks to it
            handle.progress.fail("the KV handle was released")
        if handle.fetching:
            self.num_fetched += 1
            self.num_blocks_sent += num_blocks_sent
        for block in handle.block_ids:  # a layer-wise handle pins its blocks, others hold references
            if handle.progress is not None:
                self.bm.unpin_block(block)
            else:
                self.bm.release_block(block)
        return True

    def expire(self, now: float) -> int:
        """Free the handles whose TTL passed and nobody is fetching; returns how many."""
        with self._lock:
            stale = [h.handle_id for h in self.handles.values() if h.expires_at <= now and not h.fetching]
        freed = 0
        for handle_id in stale:  # (only_idle: a FetchKV may have taken it since, off this thread)
            if self.release(handle_id, only_idle=True):
                self._forget(handle_id, f"KV handle {handle_id!r} expired (--kv-handle-ttl {self.ttl_s:g}s)")
                freed += 1
        if freed:
            self.num_expired += freed
            log.info("freed %d expired KV handle(s)", freed)
        return freed

    def _forget(self, handle_id: str, why: str) -> None:
        with self._lock:
            self._gone[handle_id] = why
            while len(self._gone) > EXPIRED_MEMORY:
                self._gone.popitem(last=False)
