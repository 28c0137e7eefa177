"""BlockManager bookkeeping: free list, reference counts, prefix hash chain, LRU eviction, fork."""

from __future__ import annotations

from services.worker.block_manager import BlockManager
from services.worker.request import EngineRequest, Request, SamplingParams, Sequence


def seq_of(tokens: list[int], n: int = 1) -> Sequence:
    req = EngineRequest("r", tuple(tokens), SamplingParams(n=n))
    return Request(req, max_tokens=8, eos_token_ids=(2,), arrival=0).sequences[0]


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the scheduler + update do for a chunk of `num_tokens`."""
    assert bm.can_allocate(seq, num_tokens)
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.register_computed_blocks(seq)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, 4)
    seq = seq_of(list(range(10)))
    compute(bm, seq, 10)
    assert len(seq.block_ids) == 3 and bm.num_used_blocks == 3
    bm.free_sequence(seq)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8


def test_prefix_hits_only_full_computed_blocks_and_leave_one_token() -> None:
    bm = BlockManager(16, 4)
    first = seq_of(list(range(12)))
    assert bm.find_cached_prefix(first) == []
    compute(bm, first, 6)  # one full block computed
    assert bm.find_cached_prefix(seq_of(list(range(12)))) == first.block_ids[:1]
    compute(bm, first, 6)
    second = seq_of(list(range(12)))
    hits = bm.find_cached_prefix(second)
    assert hits == first.block_ids[:2]  # not the third: the last token must be computed
    bm.use_cached_prefix(second, hits)
    assert second.num_computed_tokens == 8
    assert all(bm.ref_counts[b] == 2 for b in hits)
    diverging = seq_of([*range(4), 99, 98, 97, 96, 1])
    assert bm.find_cached_prefix(diverging) == first.block_ids[:1]  # the chain breaks at block 2


def test_lru_eviction_prefers_uncached_then_oldest() -> None:
    bm = BlockManager(4, 2)
    a = seq_of([1, 2, 3, 4, 5])
    compute(bm, a, 5)  # blocks: [1,2] [3,4] full and cached, [5] partial
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    again = seq_of([1, 2, 3, 4, 9])
    assert len(bm.find_cached_prefix(again)) == 2
    other = seq_of([7, 7])
    compute(bm, other, 2)  # takes an uncached block first: the cached prefix survives
    assert len(bm.find_cached_prefix(again)) == 2
    big = seq_of([8] * 6)
    compute(bm, big, 6)  # needs 3 blocks: evicts the cached ones, tail ([3,4]) first
    assert bm.find_cached_prefix(again) == []
    assert bm.num_free_blocks == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(8, 4)
    parent = seq_of(list(range(6)), n=2)
    child = parent.request.sequences[1]
    compute(bm, parent, 6)
    spare = bm.allocate_block()
    copy = bm.fork(parent, child, spare)
    assert copy == (parent.block_ids[1], spare)
    assert child.block_ids == [parent.block_ids[0], spare]
    assert bm.ref_counts[parent.block_ids[0]] == 2
    bm.free_sequence(parent)
    bm.free_sequence(child)
    assert bm.num_used_blocks == 0


def test_hit_rate_counts_prompt_tokens() -> None:
    bm = BlockManager(8, 4)
    bm.record_lookup(10, 0)
    bm.record_lookup(10, 8)
    assert bm.hit_rate == 0.4


def test_one_allocation_s_evictions_are_one_event() -> None:
    """A prompt that takes over several cached blocks reports them in one `evicted` event (an event
    per block woke every SubscribeKvEvents reader once per block), after the blocks it stored."""
    from services.worker.kv_events import KvEventLog

    log = KvEventLog(64)
    bm = BlockManager(4, 2, events=log)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8])
    compute(bm, a, 8)  # four blocks, full and cached
    bm.free_sequence(a)
    stored = log.since(0, log.epoch)
    assert [e.kind for e in stored] == ["stored"] and len(stored[0].hashes) == 4
    big = seq_of([8] * 7)
    compute(bm, big, 7)  # all four blocks again: evicts every cached one, in one event
    evicted = [e for e in log.since(stored[-1].sequence, log.epoch) if e.kind == "evicted"]
    assert len(evicted) == 1
    assert sorted(evicted[0].hashes) == sorted(stored[0].hashes)
