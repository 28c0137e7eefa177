"""The host-memory KV tier (--kv-offload-memory): prefix blocks evicted from the device cache are
kept in host memory (pinned on CUDA) instead of being dropped, and come back with one
host-to-device copy when a prompt's prefix lookup finds them there.

    BlockManager._take_free evicts a cached block ──▶ HostKVTier.save(key, block): device → host
    BlockManager.find_cached_prefix misses the device ──▶ HostKVTier.load(key, block): host → device,
        into a free device block that becomes a cached block again (then an ordinary device hit)

Both copies are enqueued on the device's current stream, the one the model runs on, so they are
ordered with the forward passes that write the evicted block before and read the loaded one
after; no synchronisation is needed. The tier is inclusive: a loaded block keeps its host copy,
so evicting it again costs nothing. Host slots are reused least recently used first.

The same slots are the swap space of preemption (scheduler.py): a preempted sequence's blocks are
copied out into slots it holds until it is scheduled again (`reserve`, `swap_out`, `swap_in`,
`release`). A held slot is no cached prefix and is never reused; reserving takes free slots
first, then the least recently used cached prefixes (a swapped sequence is certain to need its
KV, a cached prefix only may).

In a parallel group (docs/parallel.md) every rank holds its own shard of the cache, so every rank
has a `HostKVBuffer` of the same number of slots, each slot its own shard's bytes. Only rank 0's
`HostKVTier` decides (its block manager is the group's only one): each copy it makes is a
`HostCopy` handed to the StepDriver, which sends the pending ones to the other ranks ahead of the
next command that touches the cache (with the step's Forward, or before a block copy or a
disaggregation transfer), and each rank makes them in rank 0's order before that command.

Engine thread only (the block manager calls it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostCopy:
    """One copy between device blocks and host slots (`blocks[i]` <-> `slots[i]`), as rank 0's tier
    made it: the other ranks of a parallel group replay rank 0's copies, in order, on their own shard
    before the step's forward (tp_group.py)."""

    to_host: bool
    blocks: tuple[int, ...]
    slots: tuple[int, ...]


class HostKVBuffer:
    """The tier's host memory and the copies between it and the device cache: the data side only.
    Rank 0's HostKVTier decides which copies happen; every other rank of a group holds one of these,
    of the same number of slots, for its own shard of the cache."""

    def __init__(self, kv: torch.Tensor, num_blocks: int) -> None:
        """`kv`: the device cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
        if num_blocks <= 0:
            raise ValueError("the host KV tier needs room for at least one block")
        self.kv = kv
        # Slot-major ([slot, num_layers, 2, block_size, num_kv_heads, head_dim]): each slot is one
        # contiguous run, so a copy between it and the device is one asynchronous memcpy (a strided
        # host side would go through a pageable temporary, which waits for the stream).
        shape = (num_blocks, kv.shape[0], 2, *kv.shape[3:])
        self.host = torch.empty(shape, dtype=kv.dtype, pin_memory=kv.device.type == "cuda")
        log.info(
            "host KV tier: %d blocks (%.1f MiB%s)",
            num_blocks,
            self.host.numel() * self.host.element_size() / 2**20,
            ", pinned" if kv.device.type == "cuda" else "",
        )

    def copy(self, c: HostCopy) -> None:
        if c.to_host:
            self.to_host(list(c.blocks), list(c.slots))
        else:
            self.to_device(list(c.slots), list(c.blocks))

    def to_host(self, blocks: list[int], slots: list[int]) -> None:
        """Copy device `blocks` into host `slots` (before the blocks are reused): one block directly,
        several by one gather on the device into slot-major order, then one memcpy per run of
        consecutive slots."""
        if len(blocks) == 1:
            self.host[slots[0]].copy_(self.kv[:, :, blocks[0]], non_blocking=True)
            return
        index = torch.tensor(blocks, device=self.kv.device)
        staged = self.kv.index_select(2, index).movedim(2, 0).contiguous()  # [n, num_layers, 2, ...]
        for start, end, first in _runs(slots):
            self.host[first : first + end - start].copy_(staged[start:end], non_blocking=True)

    def to_device(self, slots: list[int], blocks: list[int]) -> None:
        """Copy host `slots` into device `blocks` (enqueued before the step that reads them): one
        block directly, several by one memcpy per run of consecutive slots into a device buffer,
        then one scatter."""
        if len(blocks) == 1:
            self.kv[:, :, blocks[0]].copy_(self.host[slots[0]], non_blocking=True)
            return
        staged = torch.empty((len(slots), *self.host.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
        for start, end, first in _runs(slots):
            staged[start:end].copy_(self.host[first : first + end - start], non_blocking=True)
        self.kv[:, :, torch.tensor(blocks, device=self.kv.device)] = staged.movedim(0, 2)


class HostKVTier:
    def __init__(
        self, kv: torch.Tensor, num_blocks: int, replay: Callable[[HostCopy], None] | None = None
    ) -> None:
        """`kv`: the device cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
        `replay`: rank 0 of a parallel group hands each copy to the other ranks (StepDriver)."""
        self.buffer = HostKVBuffer(kv, num_blocks)
        self.host = self.buffer.host
        self.replay = replay
        self.num_blocks = num_blocks
        self.slots: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()  # key -> (slot, chain hash)
        self.free_slots = list(range(num_blocks - 1, -1, -1))
        self.num_saved = 0  # blocks copied device -> host
        self.num_loaded = 0  # blocks copied host -> device (hits)
        self.num_held = 0  # slots held by swapped-out sequences

    def _copy(self, to_host: bool, blocks: list[int], slots: list[int]) -> None:
        c = HostCopy(to_host, tuple(blocks), tuple(slots))
        self.buffer.copy(c)
        if self.replay is not None:
            self.replay(c)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.slots

    def save(self, key: Hashable, digest: int, block: int) -> tuple[Hashable, int] | None:
        """Keep device `block` (cached under `key`, chain hash `digest`) before it is reused.
        Returns the (key, chain hash) this pushed out of the tier, if any: `key` itself when every
        slot is held by swapped-out sequences."""
        if key in self.slots:  # still here from an earlier eviction: the bytes are the same
            self.slots.move_to_end(key)
            return None
        dropped = None
        if self.free_slots:
            slot = self.free_slots.pop()
        elif not self.slots:
            return key, digest
        else:
            old_key, (slot, old_digest) = self.slots.popitem(last=False)
            dropped = (old_key, old_digest)
        self._copy(True, [block], [slot])
        self.slots[key] = (slot, digest)
        self.num_saved += 1
        return dropped

    def touch(self, key: Hashable) -> None:
        """Make `key` the most recently used (it is about to be loaded)."""
        self.slots.move_to_end(key)

    def load(self, key: Hashable, block: int) -> None:
        """Copy the block cached under `key` into device `block`."""
        slot, _ = self.slots[key]
        self.slots.move_to_end(key)
        self._copy(False, [block], [slot])
        self.num_loaded += 1

    # ---- swap space of preempted sequences ------------------------------------------------------
    def reserve(self, n: int) -> tuple[list[int], list[tuple[Hashable, int]]] | None:
        """Hold `n` slots: free ones first, then those of the least recently used cached prefixes.
        Returns the slots and the (key, chain hash) of the prefixes pushed out, or None (nothing
        changed) when fewer than `n` slots are not held already."""
        if len(self.free_slots) + len(self.slots) < n:
            return None
        taken: list[int] = []
        dropped: list[tuple[Hashable, int]] = []
        while len(taken) < n:
            if self.free_slots:
                taken.append(self.free_slots.pop())
            else:
                key, (slot, digest) = self.slots.popitem(last=False)
                dropped.append((key, digest))
                taken.append(slot)
        self.num_held += n
        return taken, dropped

    def release(self, slots: list[int]) -> None:
        """Give held `slots` back (their sequence was swapped in, or ended while swapped out)."""
        self.free_slots.extend(slots)
        self.num_held -= len(slots)

    def swap_out(self, blocks: list[int], slots: list[int]) -> None:
        """Copy device `blocks` into held host `slots` (before the blocks are reused)."""
        self._copy(True, blocks, slots)

    def swap_in(self, slots: list[int], blocks: list[int]) -> None:
        """Copy held host `slots` into device `blocks` (enqueued before the step that reads them)."""
        self._copy(False, blocks, slots)


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, first slot) of each run of consecutive slot numbers in `slots`."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i, slots[start]))
            start = i
    return runs
