"""Copy-on-write forks (BlockManager.fork_shared): every block is shared by reference count, and
the partially filled last block is copied only when a sequence writes into it while another
still holds it (beam search forks this way)."""

from __future__ import annotations

from services.worker.block_manager import BlockManager
from services.worker.request import EngineRequest, Request, SamplingParams, Sequence


def seqs_of(tokens: list[int], n: int) -> list[Sequence]:
    req = EngineRequest("r", tuple(tokens), SamplingParams(n=n))
    return Request(req, max_tokens=8, eos_token_ids=(2,), arrival=0).sequences


def write(bm: BlockManager, seq: Sequence, token: int) -> None:
    """What the scheduler and update do for one decode token."""
    assert bm.can_allocate(seq, 1)
    seq.token_ids.append(token)
    bm.allocate(seq, 1)
    seq.num_computed_tokens += 1
    bm.register_computed_blocks(seq)


def test_fork_shares_every_block_and_copies_the_partial_one_when_it_diverges() -> None:
    bm = BlockManager(16, 4)
    parent, child, other = seqs_of(list(range(10)), 3)  # 10 tokens: 2 full blocks + a partial one
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    bm.register_computed_blocks(parent)
    used = bm.num_used_blocks
    bm.fork_shared(parent, child)
    bm.fork_shared(parent, other)
    assert child.block_ids == other.block_ids == parent.block_ids
    assert bm.num_used_blocks == used and bm.take_copies() == []  # nothing copied at the fork
    assert [bm.ref_counts[b] for b in parent.block_ids] == [3, 3, 3]
    # the first writer into the shared partial block copies it; it needs one block for that
    assert bm.blocks_needed(child, 1) == 1
    write(bm, child, 100)
    [(src, dst)] = bm.take_copies()
    assert src == parent.block_ids[2] and child.block_ids == [*parent.block_ids[:2], dst]
    write(bm, other, 101)
    assert len(bm.take_copies()) == 1
    # the last holder writes in place: no copy
    assert bm.blocks_needed(parent, 1) == 0
    write(bm, parent, 102)
    assert bm.take_copies() == [] and bm.ref_counts[parent.block_ids[2]] == 1
    assert bm.num_used_blocks == used + 2
    for s in (parent, child, other):
        bm.free_sequence(s)
    assert bm.num_used_blocks == 0


def test_a_fork_that_never_writes_copies_nothing() -> None:
    bm = BlockManager(8, 4)
    parent, child = seqs_of(list(range(6)), 2)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    bm.fork_shared(parent, child)
    bm.free_sequence(child)  # (a beam dropped before its next step)
    write(bm, parent, 7)
    assert bm.take_copies() == [] and bm.num_used_blocks == 2
    bm.free_sequence(parent)
    assert bm.num_free_blocks == 8


def test_full_blocks_stay_shared_after_a_write() -> None:
    bm = BlockManager(8, 4)
    parent, child = seqs_of(list(range(8)), 2)  # exactly 2 full blocks: the next token opens a new one
    bm.allocate(parent, 8)
    parent.num_computed_tokens = 8
    bm.register_computed_blocks(parent)
    bm.fork_shared(parent, child)
    write(bm, child, 9)
    write(bm, parent, 10)
    assert bm.take_copies() == []
    assert child.block_ids[:2] == parent.block_ids[:2] and child.block_ids[2] != parent.block_ids[2]


def test_refork_moves_only_the_entries_after_the_beams_part() -> None:
    """Beam search reassigns an unchosen beam's sequence to a chosen parent every step: the
    blocks both tables share keep their references (no unref / ref of the whole table), and the
    result is what free_sequence + fork_shared give."""

    def beams(bm: BlockManager) -> tuple[Sequence, Sequence]:
        parent, child = seqs_of(list(range(10)), 2)  # 2 full blocks + a partial one
        bm.allocate(parent, 10)
        parent.num_computed_tokens = 10
        bm.register_computed_blocks(parent)
        bm.fork_shared(parent, child)
        for token in range(6):  # they part: each writes its own tokens (child copies the partial block)
            write(bm, parent, 100 + token)
            write(bm, child, 200 + token)
        return parent, child

    fast, slow = BlockManager(32, 4), BlockManager(32, 4)
    (p1, c1), (p2, c2) = beams(fast), beams(slow)
    assert c1.block_ids[:2] == p1.block_ids[:2] and c1.block_ids[2:] != p1.block_ids[2:]
    touched: list[int] = []
    ref, unref = fast._ref, fast._unref
    fast._ref = lambda b: (touched.append(b), ref(b))[1]  # type: ignore[method-assign]
    fast._unref = lambda b: (touched.append(b), unref(b))[1]  # type: ignore[method-assign]
    fast.refork_shared(p1, c1)
    slow.free_sequence(c2)
    slow.fork_shared(p2, c2)
    assert c1.block_ids == p1.block_ids and c2.block_ids == p2.block_ids
    assert fast.ref_counts == slow.ref_counts and fast.num_used_blocks == slow.num_used_blocks
    assert not set(touched) & set(p1.block_ids[:2])  # the shared prompt blocks were not touched
    assert c1.num_computed_tokens == p1.num_computed_tokens and c1.block_hashes == p1.block_hashes
    for s in (p1, c1):
        fast.free_sequence(s)
    assert fast.num_used_blocks == 0


def test_reseat_beams_shares_the_parents_full_blocks_and_frees_the_rest() -> None:
    """A beam step launched ahead (beam_search.py): beam j takes its parent's full blocks and its
    own fresh block; blocks nobody's new table holds go back."""
    bm = BlockManager(32, 4)
    beams = seqs_of(list(range(6)), 3)  # 6 tokens: one full block, one partial
    for seq in beams:
        bm.allocate(seq, 6)
        seq.num_computed_tokens = 6
        bm.register_computed_blocks(seq)
    old = [list(s.block_ids) for s in beams]
    tails = [bm.allocate_block() for _ in beams]
    used = bm.num_used_blocks
    bm.reseat_beams(beams, [1, 1, 0], tails, 1)
    assert [s.block_ids for s in beams] == [
        [old[1][0], tails[0]],
        [old[1][0], tails[1]],
        [old[0][0], tails[2]],
    ]
    assert bm.ref_counts[old[1][0]] == 2 and bm.ref_counts[old[0][0]] == 1
    assert bm.ref_counts[old[2][0]] == 0 and all(bm.ref_counts[s.block_ids[1]] == 1 for s in beams)
    assert bm.num_used_blocks == used - 4  # beam 2's full block and the three partial ones
    for s in beams:
        bm.free_sequence(s)
    assert bm.num_used_blocks == 0
