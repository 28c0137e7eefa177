"""The host work of a beam step launched ahead grows with the beams that change parent, not with
every beam or the output's length (BlockManager.reseat_beams, BeamSearch._reseat), and a beam
writes its partly filled block in place, taking a fresh block only where a position starts one
(BlockManager.beam_tail)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.sampling import SamplingParams as ApiSamplingParams
from services.worker.beam_search import BeamSearch
from services.worker.block_manager import BlockManager, _common_prefix
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import EngineRequest, Request, SamplingParams, Sequence
from services.worker.scheduler import Scheduler, SchedulerOutput


def beams_of(num_tokens: int, width: int, bm: BlockManager) -> list[Sequence]:
    req = EngineRequest("r", tuple(range(num_tokens)), SamplingParams(n=width))
    beams = Request(req, max_tokens=8, eos_token_ids=(2,), arrival=0).sequences
    for seq in beams:
        bm.allocate(seq, num_tokens)
        seq.num_computed_tokens = num_tokens
        bm.register_computed_blocks(seq)
    return beams


def counted(bm: BlockManager) -> Counter[str]:
    """Counts the block manager's reference changes from now on."""
    calls: Counter[str] = Counter()
    ref, unref = bm._ref, bm._unref

    def counted_ref(block: int) -> None:
        calls["ref"] += 1
        ref(block)

    def counted_unref(block: int) -> None:
        calls["unref"] += 1
        unref(block)

    bm._ref, bm._unref = counted_ref, counted_unref  # type: ignore[method-assign]
    return calls


def test_reseat_touches_only_the_beams_that_change_parent() -> None:
    bm = BlockManager(64, 4)
    beams = beams_of(22, 4, bm)  # 5 full blocks and a partial one each
    old_lists = [(s.block_ids, s.block_hashes) for s in beams]
    old = [list(s.block_ids) for s in beams]
    tails = [bm.allocate_block() for _ in beams]
    calls = counted(bm)
    bm.reseat_beams(beams, [0, 0, 2, 3], tails, 5)
    # beams 0, 2 and 3 go on in their own sequence: the same lists, the partial block dropped
    for j in (0, 2, 3):
        assert beams[j].block_ids is old_lists[j][0] and beams[j].block_hashes is old_lists[j][1]
        assert beams[j].block_ids == [*old[j][:5], tails[j]]
    # beam 1 moves to beam 0's table
    assert beams[1].block_ids == [*old[0][:5], tails[1]]
    assert beams[1].block_hashes == beams[0].block_hashes[:5]
    # one reference per block of beam 0 now shared, one release per block of beam 1 and per
    # dropped partial block: nothing for the full blocks of the beams that stay
    assert calls == Counter(ref=5, unref=6 + 3)
    assert all(bm.ref_counts[b] == 2 for b in old[0][:5])
    assert all(bm.ref_counts[b] == 0 for b in old[1])
    for seq in beams:
        bm.free_sequence(seq)
    assert bm.num_used_blocks == 0


def test_reseat_with_every_beam_on_its_own_sequence_releases_the_partial_blocks_only() -> None:
    bm = BlockManager(64, 4)
    beams = beams_of(24, 3, bm)  # 6 full blocks, no partial one: nothing to drop
    old_lists = [s.block_ids for s in beams]
    old = [list(s.block_ids) for s in beams]
    tails = [bm.allocate_block() for _ in beams]
    calls = counted(bm)
    bm.reseat_beams(beams, [0, 1, 2], tails, 6)
    assert calls == Counter()
    assert [s.block_ids for s in beams] == [[*o, t] for o, t in zip(old, tails, strict=True)]
    assert all(s.block_ids is lst for s, lst in zip(beams, old_lists, strict=True))
    for seq in beams:
        bm.free_sequence(seq)
    assert bm.num_used_blocks == 0


def test_beam_steps_ahead_keep_no_logprob_entries_unless_asked(stories_dir: Path) -> None:
    """Each beam's per-token logprob entries are built only for a client that asked for logprobs
    (the returned choices carry none otherwise); a beam that goes on in its own sequence appends
    its token to its own list, only a beam moved to another parent copies that parent's."""
    engine = Engine(
        WorkerConfig(
            model=str(stories_dir), device="cpu", kv_cache_memory="16MiB", block_size=4, async_scheduling="on"
        )
    )
    prompt = (1, 403, 407, 315, 290)
    plain = ApiSamplingParams(
        temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=16, ignore_eos=True
    )
    engine.add_request(EngineRequest("plain", prompt, plain))
    request = engine.requests["plain"]
    beam = request.beam
    assert beam is not None
    lists_made = 0
    moves = 0
    while engine.has_unfinished():
        before = {s.seq_id: s.token_ids for s in beam.live}
        parents_before = beam.num_ahead
        engine.step()
        assert beam.entries == {} or set(beam.entries.values()) == {None}
        if beam.num_ahead > parents_before and not request.is_finished:
            lists_made += sum(s.token_ids is not before.get(s.seq_id) for s in beam.live)
            moves += 1
    assert moves > 0 and engine.scheduler.num_beam_steps_ahead > 0
    assert lists_made < moves * len(beam.live)  # most beams append in place
    with_logprobs = ApiSamplingParams(
        **{**{f: getattr(plain, f) for f in plain.__dataclass_fields__}, "logprobs": 1}
    )
    results = engine.generate([list(prompt)], with_logprobs)
    assert results[0].logprobs is not None and len(results[0].logprobs[0]) == 16


@given(st.lists(st.integers(0, 2), max_size=8), st.lists(st.integers(0, 2), max_size=8))
def test_common_prefix_is_the_leading_entries_two_tables_share(a: list[int], b: list[int]) -> None:
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    assert _common_prefix(a, b) == shared


@pytest.mark.parametrize("in_place", [False, True])
def test_reseat_keeps_each_beams_own_partly_filled_block_written_in_place(in_place: bool) -> None:
    """Steps launched ahead in the middle of a block: each beam's tail is its own partly filled
    block (BlockManager.beam_tail). A beam that stays changes nothing; a moved beam takes its
    parent's full blocks and keeps its own partly filled block; no block is taken or freed
    (`in_place`: told so, the beams that stay are not visited; else found out)."""
    bm = BlockManager(64, 4)
    beams = beams_of(22, 4, bm)  # 5 full blocks and a partial one each, none shared
    old_lists = [(s.block_ids, s.block_hashes) for s in beams]
    old = [list(s.block_ids) for s in beams]
    tails = [bm.beam_tail(s, 22) for s in beams]
    assert tails == [o[5] for o in old]
    free = bm.num_free_blocks
    calls = counted(bm)
    bm.reseat_beams(beams, [0, 0, 2, 3], [t for t in tails if t is not None], 5, in_place=in_place)
    for j in (0, 2, 3):
        assert beams[j].block_ids is old_lists[j][0] and beams[j].block_ids == old[j]
        assert beams[j].block_hashes is old_lists[j][1] and len(beams[j].block_hashes) == 5
    assert beams[1].block_ids == [*old[0][:5], old[1][5]]
    assert beams[1].block_hashes == beams[0].block_hashes[:5]
    # beam 0's full blocks gained a holder, beam 1's old full blocks lost theirs: nothing else
    assert calls == Counter(ref=5, unref=5)
    assert bm.num_free_blocks == free + 5
    assert [bm.ref_counts[b] for b in old[0]] == [2] * 5 + [1]
    for seq in beams:
        bm.free_sequence(seq)
    assert bm.num_used_blocks == 0


def test_beam_tail_is_fresh_at_a_block_start_or_for_a_shared_partly_filled_block() -> None:
    bm = BlockManager(64, 4)
    parent, child = beams_of(22, 2, bm)
    assert bm.beam_tail(parent, 24) is None  # (the position starts a block)
    bm.free_sequence(child)
    bm.fork_shared(parent, child)  # the partly filled block shared: copy-on-write still pending
    assert bm.beam_tail(parent, 22) is None and bm.beam_tail(child, 22) is None
    bm.free_sequence(child)
    assert bm.beam_tail(parent, 22) == parent.block_ids[5]
    bm.free_sequence(parent)
    assert bm.num_used_blocks == 0


@pytest.mark.parametrize("abort_at_block_start", [False, True])
def test_steps_ahead_take_a_fresh_block_only_at_a_block_start(
    stories_dir: Path, abort_at_block_start: bool
) -> None:
    """With steps launched ahead, a beam writes its next position into its own partly filled
    block (the device copies its parent's there first) and takes a fresh block only where the
    position starts one. Every block goes back: at the search's end, when a search that ends
    early discards the step launched ahead, and when a request is aborted while its step ahead,
    in flight, writes in place (or into fresh blocks)."""
    engine = Engine(
        WorkerConfig(
            model=str(stories_dir), device="cpu", kv_cache_memory="16MiB", block_size=4, async_scheduling="on"
        )
    )
    bm = engine.block_manager
    free_before = bm.num_free_blocks
    prompt = (1, 403, 407, 315, 290)
    greedy = engine.generate([list(prompt)], ApiSamplingParams(temperature=0.0, max_tokens=6))[0].token_ids[0]
    # stop ids the beams meet, early stopping: the search ends before max_tokens (a step ahead discarded)
    early = ApiSamplingParams(
        temperature=0.0,
        n=2,
        best_of=3,
        use_beam_search=True,
        early_stopping=True,
        max_tokens=40,
        stop_token_ids=tuple(dict.fromkeys(greedy[1::2])),
    )
    long = ApiSamplingParams(
        temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=30, ignore_eos=True
    )
    engine.add_request(EngineRequest("early", prompt, early))
    engine.add_request(EngineRequest("long", prompt, long))
    engine.add_request(EngineRequest("aborted", (1, 45, 99), long))
    discarded: list[Request] = []
    release = BeamSearch.release_tails

    def counted_release(self: BeamSearch, sched: Scheduler) -> None:
        if self.pending_tails:
            discarded.append(self.live[0].request)
        release(self, sched)

    in_place = fresh = 0
    abort_now = False
    continuation = engine.scheduler.schedule_continuation

    def checked_continuation(prev: SchedulerOutput) -> SchedulerOutput | None:
        """Each beam's tail as the step ahead is planned (before the host reads the step before)."""
        nonlocal in_place, fresh, abort_now
        out = continuation(prev)
        for item in out.scheduled if out is not None else []:
            if item.beam_tail < 0:
                continue
            beam = item.seq.request.beam
            assert beam is not None and beam.pending_tails[item.seq.seq_id] == item.beam_tail
            if item.start % 4:  # its own partly filled block, held by it alone
                assert item.beam_tail == item.seq.block_ids[item.start // 4]
                assert bm.ref_counts[item.beam_tail] == 1 and item.beam_tail not in beam.fresh_tails
                in_place += 1
            else:
                assert item.beam_tail in beam.fresh_tails and item.beam_tail not in item.seq.block_ids
                fresh += 1
            if item.seq.request.request_id == "aborted" and in_place and fresh:
                abort_now = abort_now or (item.start % 4 == 0) == abort_at_block_start
        return out

    engine.scheduler.schedule_continuation = checked_continuation  # type: ignore[method-assign]
    BeamSearch.release_tails = counted_release  # type: ignore[method-assign]
    aborted = False
    try:
        while engine.has_unfinished():
            engine.step()
            if abort_now and not aborted:  # (its step launched ahead still in flight)
                assert engine._launched is not None
                engine.abort("aborted")
                aborted = True
    finally:
        BeamSearch.release_tails = release  # type: ignore[method-assign]
    assert aborted and in_place > fresh > 0
    # (the search that ended early had a step ahead holding tails; an abort comes between steps,
    # when the host has already placed the step in flight's tails in the tables: they go with them)
    assert "early" in {r.request_id for r in discarded}
    assert bm.num_free_blocks == free_before
    assert all(count == 0 for count in bm.ref_counts)
