"""CPU bookkeeping of the paged KV cache's fixed-size blocks.

Every block is either referenced (ref_count > 0, owned by one or more sequences) or free. Free
blocks sit in one LRU-ordered pool: blocks without cached content at the front (reused first),
then blocks that still hold a full, hashed prefix block, least recently freed first. Taking a
free block that holds a cached prefix evicts its hash.

Prefix caching: a full block's identity is a hash chain, hash(parent hash, its token ids), so
equal hashes mean equal whole prefixes (services/common/block_hash.py, the definition the gateway
shares; each store and eviction is reported to `events`, kv_events.py). A block is registered only once its KV has been
computed, so a hit never reads KV that is still being written. A lookup always leaves at least
the last token to compute, because the step that computes it produces the next-token logits.

Sharing (n > 1 choices, beams, prefix hits) is reference counting. A fork shares its parent's
blocks; the partially filled last block must not be written by two sequences, so it is copied:
`fork` copies it at once (n > 1 choices, whose spare blocks the scheduler set aside at admission),
`fork_shared` shares it too and `allocate` copies it the first time a sequence writes into it
while another still holds it (copy-on-write: the last holder writes in place, nothing is copied
for a fork that never writes).

Sliding windows: when every layer of the model slides (`sliding_window` > 0: Mistral with a
window), a sequence's blocks that fall wholly out of the window of its next query are freed after
each step (`free_out_of_window`), so a long sequence holds about window / block_size + 1 blocks.
Its block table keeps their entries as placeholders (`Sequence.num_freed_blocks` leading ones)
pointing at its first block still held: the kernels may load a masked position's K/V there (a
tile that starts before the window), which must be finite, never read as a score. A freed block
is hashed before it is freed, so it stays a valid cached prefix in the free pool (its KV depends
on its prefix only) until reused; the placeholders are never hashed, shared or freed again.
Models with full-attention layers (Gemma 2/3, gpt-oss) free nothing: those layers read every
position.

Swap (preemption with a host tier, kv_offload.py): `swap_out` copies a sequence's computed blocks
into host slots it holds and frees its device blocks, keeping its computed token count;
`swap_in` gives it fresh blocks and copies them back; `free_sequence` releases the slots of a
sequence that ends while swapped out. A sequence with freed out-of-window blocks is not swapped
(its placeholders hold no KV of its own): it is recomputed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

from services.common.block_hash import chain_hash
from services.worker.kv_events import KvEventLog
from services.worker.kv_offload import HostKVTier
from services.worker.request import Sequence

BlockKey = tuple[int, tuple[int, ...]]  # (parent chain hash, token ids of the block)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        events: KvEventLog | None = None,
        offload: HostKVTier | None = None,
        sliding_window: int = 0,  # > 0: EVERY layer slides this window (free_out_of_window)
    ) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Pins keep a block allocated without sharing it: a layer-wise KV handle's reader reads the
        # blocks of a prefill still running (kv_handles.py); a reference would make the prefill's
        # next write into its partial last block copy it first (copy-on-write).
        self.pins = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self.block_digests: list[int] = [0] * num_blocks  # chain hash of a cached block
        self.events = events
        self.offload = offload if enable_prefix_caching else None
        self.swap_space = offload  # also without prefix caching: preemption swaps into it
        self.num_swapped_out = 0  # sequences swapped out to the host tier
        self.num_swapped_in = 0  # sequences swapped back in
        self.num_host_hit_tokens = 0  # prefix tokens brought back from the host tier
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.sliding_window = sliding_window
        self.num_window_freed_blocks = 0  # blocks freed by free_out_of_window (a metric)
        self.copies: list[tuple[int, int]] = []  # copy-on-write block copies not handed out yet
        # Evictions of one allocation (or one prefix lookup's host loads) go out as one `evicted`
        # event: an event per block woke each subscriber's event loop once per block.
        self._evicting: list[int] | None = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids)) + self._copy_on_write(seq, num_new_tokens)

    def _copy_on_write(self, seq: Sequence, num_new_tokens: int) -> int:
        """1 when the next write of `seq` lands in a partially filled block another sequence
        also holds (fork_shared): that block is copied first."""
        index = seq.num_computed_tokens // self.block_size
        if (
            num_new_tokens <= 0
            or seq.num_computed_tokens % self.block_size == 0
            or index >= len(seq.block_ids)
        ):
            return 0
        return int(self.ref_counts[seq.block_ids[index]] > 1)

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) copy-on-write block copies made since the last call: the device does
        them before the forward that writes into dst."""
        copies, self.copies = self.copies, []
        return copies

    @staticmethod
    def _key(parent: int, tokens: list[int]) -> tuple[int, BlockKey]:
        key = (parent, tuple(tokens))
        return chain_hash(parent, key[1]), key

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (not referenced yet)."""
        if not self.enable_prefix_caching:
            return []
        with self._evictions_as_one_event():  # (a host-tier load may evict)
            return self._find_cached_prefix(seq)

    def _find_cached_prefix(self, seq: Sequence) -> list[int]:
        bs = self.block_size
        hits: list[int] = []
        free_hits = 0  # hits in the free pool, moved to its end so that a host load cannot take them
        parent = seq.request.root_hash
        for i in range((seq.num_tokens - 1) // bs):
            parent, key = self._key(parent, seq.key_tokens(i * bs, (i + 1) * bs))
            block = self.cached.get(key)
            if block is None and self.offload is not None and key in self.offload:
                block = self._load_from_host(key, parent, free_hits)
            if block is None:
                break
            if self._in_free_list(block):
                self.free.move_to_end(block)
                free_hits += 1
            hits.append(block)
        return hits

    def _load_from_host(self, key: BlockKey, digest: int, protected: int) -> int | None:
        """Bring a host-tier block back into a free device block, cached again (unreferenced, most
        recently used); None when every free block is one of the `protected` hits before it."""
        assert self.offload is not None
        if len(self.free) <= protected:
            return None
        self.offload.touch(key)  # the eviction below may push a host block out: not this one
        block = self._take_free()
        if key not in self.offload:  # (a tier of one block)
            self._unref(block)
            return None
        self.offload.load(key, block)
        self.cached[key] = block
        self.block_keys[block] = key
        self.block_digests[block] = digest
        self._unref(block)
        self.num_host_hit_tokens += self.block_size
        return block

    # ---- allocation ----------------------------------------------------------------------------
    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None, extra: int = 0
    ) -> bool:
        """Whether `seq` (after taking `cached_blocks`) can get blocks for `num_new_tokens` more
        tokens plus `extra` single blocks."""
        return self.free_blocks_taken(seq, num_new_tokens, cached_blocks or [], extra) <= len(self.free)

    def free_blocks_taken(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int], extra: int
    ) -> int:
        """Free blocks `seq` takes for `num_new_tokens` more tokens after taking `cached_blocks`,
        plus `extra` single blocks; reviving a free cached block costs a free block too."""
        revived = sum(1 for b in cached_blocks if self._in_free_list(b))
        return self.blocks_needed_with_prefix(seq, num_new_tokens, len(cached_blocks)) + revived + extra

    def blocks_needed_with_prefix(self, seq: Sequence, num_new_tokens: int, num_cached_blocks: int) -> int:
        computed = max(seq.num_computed_tokens, num_cached_blocks * self.block_size)
        total = -(-(computed + num_new_tokens) // self.block_size)
        return max(0, total - max(len(seq.block_ids), num_cached_blocks)) + self._copy_on_write(
            seq, num_new_tokens
        )

    def use_cached_prefix(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Give a not-yet-computed `seq` the cached blocks; they count as computed."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        parent = seq.request.root_hash
        for block in cached_blocks:
            self._ref(block)
            seq.block_ids.append(block)
            assert self.block_keys[block] is not None
            parent = self.block_digests[block]
            seq.block_hashes.append(parent)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks so `seq` can hold `num_new_tokens` more computed tokens (checked first)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            raise RuntimeError("allocate without can_allocate")
        if needed == 0:  # (most decode steps: the last block has room, and no copy-on-write)
            return
        with self._evictions_as_one_event():
            if self._copy_on_write(seq, num_new_tokens):
                index = seq.num_computed_tokens // self.block_size
                shared = seq.block_ids[index]
                seq.block_ids[index] = self._take_free()
                self.copies.append((shared, seq.block_ids[index]))
                self._unref(shared)
                needed -= 1
            for _ in range(needed):
                seq.block_ids.append(self._take_free())

    def allocate_block(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV block")
        return self._take_free()

    def free_sequence(self, seq: Sequence) -> None:
        """Drop `seq`'s references (and host slots when swapped out); its tail blocks become the
        first candidates for eviction."""
        for block in reversed(seq.block_ids[seq.num_freed_blocks :]):
            self._unref(block)
        if seq.swapped is not None:
            assert self.swap_space is not None
            self.swap_space.release(seq.swapped)
            seq.swapped = None
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_freed_blocks = 0

    def free_out_of_window(self, seq: Sequence) -> None:
        """Free the blocks of `seq` that no query from its next position on can see (every layer
        sliding: its next query at p = num_computed_tokens sees keys > p - window); their table
        entries become placeholders (module docstring). Call after `register_computed_blocks`."""
        if self.sliding_window <= 0 or seq.request.req.hold_kv:
            return  # (a prefill-only request hands every block to a KV handle: kv_handles.py)
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        # only hashed (full, computed) blocks, and never the last: the placeholders point at it
        num_out = min(max(0, first_needed) // self.block_size, len(seq.block_hashes), len(seq.block_ids) - 1)
        if num_out <= seq.num_freed_blocks:
            return
        for i in range(seq.num_freed_blocks, num_out):
            self._unref(seq.block_ids[i])
        self.num_window_freed_blocks += num_out - seq.num_freed_blocks
        placeholder = seq.block_ids[num_out]
        seq.block_ids[:num_out] = [placeholder] * num_out
        seq.num_freed_blocks = num_out

    # ---- swap ----------------------------------------------------------------------------------
    def swap_out(self, seq: Sequence) -> bool:
        """Copy the computed KV of `seq` into host slots and free its device blocks; it keeps its
        computed token count. False (nothing changed) without a host tier, without computed KV, or
        when the tier lacks room: then recompute."""
        num = -(-seq.num_computed_tokens // self.block_size)
        if self.swap_space is None or seq.swapped is not None or num == 0 or seq.num_freed_blocks:
            return False
        reserved = self.swap_space.reserve(num)
        if reserved is None:
            return False
        slots, dropped = reserved
        gone = [digest for key, digest in dropped if key not in self.cached]
        if gone and self.events is not None:
            self.events.evicted(gone)
        self.swap_space.swap_out(seq.block_ids[:num], slots)
        computed = seq.num_computed_tokens
        self.free_sequence(seq)
        seq.num_computed_tokens = computed
        seq.swapped = slots
        self.num_swapped_out += 1
        return True

    def swap_in(self, seq: Sequence) -> None:
        """Give swapped-out `seq` device blocks for its computed KV and copy it back (the caller
        checked there are enough free blocks: `blocks_needed` counts them); its full blocks are
        offered to the prefix cache again."""
        assert self.swap_space is not None and seq.swapped is not None and not seq.block_ids
        if len(seq.swapped) > len(self.free):
            raise RuntimeError("swap_in without free blocks")
        slots, seq.swapped = seq.swapped, None
        with self._evictions_as_one_event():
            seq.block_ids = [self._take_free() for _ in slots]
        self.swap_space.swap_in(slots, seq.block_ids)
        self.swap_space.release(slots)
        self.num_swapped_in += 1
        self.register_computed_blocks(seq)

    def fork(self, parent: Sequence, child: Sequence, spare_block: int | None) -> tuple[int, int] | None:
        """Share `parent`'s computed blocks with `child`; the partial last one is copied into
        `spare_block` (allocated beforehand). Returns the (src, dst) block copy the device must do
        before `child` computes, or None (then `spare_block` is returned to the pool)."""
        num_full = parent.num_computed_tokens // self.block_size
        child.num_freed_blocks = min(parent.num_freed_blocks, num_full)  # placeholders: not shared
        child.block_ids = list(parent.block_ids[: child.num_freed_blocks])
        for block in parent.block_ids[child.num_freed_blocks : num_full]:
            self._ref(block)
            child.block_ids.append(block)
        child.block_hashes = list(parent.block_hashes[:num_full])
        child.num_computed_tokens = parent.num_computed_tokens
        copy: tuple[int, int] | None = None
        if parent.num_computed_tokens % self.block_size == 0:
            if spare_block is not None:
                self._unref(spare_block)
        else:
            assert spare_block is not None
            child.block_ids.append(spare_block)
            copy = parent.block_ids[num_full], spare_block
        if 0 < child.num_freed_blocks < len(child.block_ids):  # placeholders at a block it holds
            n = child.num_freed_blocks
            child.block_ids[:n] = [child.block_ids[n]] * n
        return copy

    def fork_shared(self, parent: Sequence, child: Sequence) -> None:
        """Share every block holding `parent`'s computed tokens with `child` (which holds none),
        the partially filled last one too: `allocate` copies that one when either writes into it
        while both hold it (beam search, beam_search.py)."""
        assert not child.block_ids, "fork into a sequence without blocks"
        num_blocks = -(-parent.num_computed_tokens // self.block_size)
        # (out-of-window placeholders stay placeholders: pointing at a block it holds, not shared)
        child.num_freed_blocks = parent.num_freed_blocks
        child.block_ids = list(parent.block_ids[:num_blocks])
        for block in child.block_ids[child.num_freed_blocks :]:
            self._ref(block)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def refork_shared(self, parent: Sequence, child: Sequence) -> None:
        """fork_shared into a sequence that may hold blocks (beam search: an unchosen beam becomes
        a child of a chosen one). Beams share most of their table (the prompt, the output before
        they parted): those entries keep their references, and only the entries after the first
        difference are dropped and shared anew, rather than the whole table each step (the same
        reference counts as free_sequence + fork_shared)."""
        if child.swapped is not None or child.num_freed_blocks or parent.num_freed_blocks:
            self.free_sequence(child)  # (swapped or out-of-window placeholders: the general path)
            self.fork_shared(parent, child)
            return
        num_blocks = -(-parent.num_computed_tokens // self.block_size)
        shared = parent.block_ids[:num_blocks]
        same = 0
        for mine, theirs in zip(child.block_ids, shared, strict=False):
            if mine != theirs:
                break
            same += 1
        for block in reversed(child.block_ids[same:]):
            self._unref(block)
        for block in shared[same:]:
            self._ref(block)
        child.block_ids = list(shared)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past `seq`'s tokens (speculative decoding: blocks that only held
        rejected drafts; never registered, as they hold no computed token)."""
        keep = -(-seq.num_tokens // self.block_size)
        while len(seq.block_ids) > keep:
            self._unref(seq.block_ids.pop())

    def release_block(self, block: int) -> None:
        self._unref(block)

    def beam_tail(self, seq: Sequence, position: int) -> int | None:
        """The block a beam launched ahead writes `position` into, when it is its own: its partly
        filled last block, held by it alone (beam_search.py: the device copies its parent's partly
        filled block into it, then the step writes `position` after the copied slots). None when
        `position` starts a block (or that block is shared: a copy-on-write still pending): the
        beam takes a fresh block (`allocate_block`)."""
        index = position // self.block_size
        if position % self.block_size == 0 or index >= len(seq.block_ids):
            return None
        block = seq.block_ids[index]
        return block if self.ref_counts[block] == 1 and not self.pins[block] else None

    def reseat_beams(
        self,
        seqs: list[Sequence],
        parents: list[int],
        tails: list[int],
        num_shared: int,
        in_place: bool = False,
    ) -> None:
        """Beam search launched ahead (beam_search.py): `seqs[j]` takes the first `num_shared`
        blocks of `seqs[parents[j]]`'s table (full ones, shared by reference count) and `tails[j]`
        after them: its own partly filled block, written in place (`beam_tail`), or a fresh block
        it took when the step was launched. The old tables' references go (the same counts as
        freeing them and forking anew).

        O(beams whose parent changed): a beam that continues its own sequence (`parents[j] == j`,
        most of them) keeps its table's list, untouched when its tail is its own partly filled
        block, else with its fresh block appended; only a beam moved to another parent's table is
        rebuilt, its counts changed by the net difference. `in_place`: every tail is its beam's own
        partly filled block (none fresh): the beams that stay are not even visited."""
        moved = [j for j, p in enumerate(parents) if p != j]
        # the moved beams' new tables and hashes, from the old lists, before any list is changed
        new = [
            (seqs[parents[j]].block_ids[:num_shared], seqs[parents[j]].block_hashes[:num_shared])
            for j in moved
        ]
        # A moved beam's old and new tables share their leading blocks (the prompt's, those of
        # the beams' common ancestors), whose counts do not change: only what follows is counted.
        # (References first: a block both gained and lost never reaches zero on the way.)
        gained: list[int] = []
        lost: list[int] = []
        for (blocks, _), j in zip(new, moved, strict=True):
            old = seqs[j].block_ids
            same = _common_prefix(blocks, old)
            gained += blocks[same:]
            # (its own partly filled block, written in place, stays its tail)
            lost += old[same:num_shared] if old[num_shared:] == [tails[j]] else old[same:]
        for j, seq in enumerate(seqs if not in_place else ()):
            assert len(seq.block_ids) >= num_shared and not seq.num_freed_blocks
            if parents[j] == j and seq.block_ids[num_shared:] != [tails[j]]:  # (a fresh tail)
                lost += seq.block_ids[num_shared:]
                del seq.block_ids[num_shared:], seq.block_hashes[num_shared:]
                seq.block_ids.append(tails[j])
        for (blocks, hashes), j in zip(new, moved, strict=True):
            seqs[j].block_ids, seqs[j].block_hashes = [*blocks, tails[j]], hashes
        for block in gained:
            self._ref(block)
        for block in lost:
            self._unref(block)

    def pin_block(self, block: int) -> None:
        """Keep an allocated block off the free list until `unpin_block`, whoever frees it."""
        assert self.ref_counts[block] > 0 or self.pins[block] > 0, f"block {block} is free"
        self.pins[block] += 1

    def unpin_block(self, block: int) -> None:
        self.pins[block] -= 1
        assert self.pins[block] >= 0, f"block {block} unpinned twice"
        if self.pins[block] == 0 and self.ref_counts[block] == 0:
            self._to_free_list(block)

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that became full and computed, and offer them to the cache."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        stored: list[int] = []
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.request.root_hash
            digest, key = self._key(parent, seq.key_tokens(i * bs, (i + 1) * bs))
            seq.block_hashes.append(digest)
            block = seq.block_ids[i]
            if self.enable_prefix_caching and self.block_keys[block] is None and key not in self.cached:
                self.cached[key] = block
                self.block_keys[block] = key
                self.block_digests[block] = digest
                stored.append(digest)
        if stored and self.events is not None:
            self.events.stored(stored)

    # ---- internals -----------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.block_keys[block]
        if key is not None:  # evict the cached prefix it held (to the host tier when there is one)
            del self.cached[key]
            self.block_keys[block] = None
            gone = [self.block_digests[block]]
            if self.offload is not None:
                dropped = self.offload.save(key, self.block_digests[block], block)
                # still cached, on the host; what the host tier dropped (this key itself when every
                # host slot holds swapped KV) is gone unless on the device
                gone = [dropped[1]] if dropped is not None and dropped[0] not in self.cached else []
            if gone and self._evicting is not None:
                self._evicting += gone
            elif gone and self.events is not None:
                self.events.evicted(gone)
        self.ref_counts[block] = 1
        return block

    @contextlib.contextmanager
    def _evictions_as_one_event(self) -> Iterator[None]:
        """The evictions `_take_free` makes meanwhile go out as one `evicted` event, at the end."""
        self._evicting = []
        try:
            yield
        finally:
            gone, self._evicting = self._evicting, None
            if gone and self.events is not None:
                self.events.evicted(gone)

    def _ref(self, block: int) -> None:
        if self._in_free_list(block):
            del self.free[block]
        self.ref_counts[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0 and not self.pins[block]:
            self._to_free_list(block)

    def _in_free_list(self, block: int) -> bool:
        return self.ref_counts[block] == 0 and not self.pins[block]

    def _to_free_list(self, block: int) -> None:
        self.free[block] = None
        if self.block_keys[block] is None:
            self.free.move_to_end(block, last=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading entries `a` and `b` share: a binary search on slice equality (compared in
    C), not a Python loop over every entry."""
    lo, hi = 0, min(len(a), len(b))
    if a[: hi - 1] == b[: hi - 1]:  # (beams that parted at their last block: the usual case)
        return hi if a[hi - 1 : hi] == b[hi - 1 : hi] else hi - 1
    hi -= 2  # (known to differ before hi - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
