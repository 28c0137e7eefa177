"""The prefill side's KV handles: a finished prefill's prompt blocks, kept for a decode worker.

    Prefill(prompt) -> the engine computes the prompt and samples the first token; its blocks move
    to a handle (`hold`) -> a decode worker's FetchKV claims it (`take`) and streams it
    (kv_transfer.py) -> `release` gives the blocks back when the stream ends, on ReleaseKV, or
    when the TTL (--kv-handle-ttl) passes with nobody fetching (`expire`).

Engine thread only: it references and frees blocks. Reading a held block off that thread is
safe: a held block has a reference, so nobody writes it until `release`, and `release` only runs
after the stream that reads it ended.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.worker.block_manager import BlockManager

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
