"""Beam search inside the engine: `width` beams decode together, every step keeps the best.

The request (fan_out.py) has `width` sequences: the first computes the prompt, the others are
parked until then, as n > 1 choices are. Each step every live beam is one decode row. When all of
them are rows of the step, the runner selects on the device (beam_select.py): the top K over
beams x vocab of the cumulative logprobs, read back as K (total, beam, token, logprob, rank)
rows. Otherwise (a beam computed again after a preemption meets the others' rows of an earlier
step) each row brings its own top K (its `logprobs`, set to `candidates_per_beam` by
fan_out.attach) and the host merges them in the same order. Then the step here picks, exactly as
transformers' `generate(num_beams=...)` does:

- the K = max(2, 1 + number of stop ids) x width best continuations by cumulative logprob;
- of the first `width` of them, those ending in a stop id (or reaching max_tokens) become finished
  hypotheses scored cumulative / generated_length ** length_penalty; at most `width` are kept;
- the best `width` that go on are the next beams;
- the search ends when max_tokens is reached, or (early_stopping True) once `width` hypotheses
  are finished, or when no running beam can beat the worst kept hypothesis: False compares at
  the current length, "never" at max_tokens when length_penalty > 0 (transformers'
  `_check_early_stop_heuristic`).

Where the next beams go:

- the next step was launched ahead (async scheduling: Scheduler.schedule_continuation), before
  the host read these picks: new beam j goes in live beam j's sequence, its table its parent's
  full blocks and then the block it writes (`hold_tail`): its own partly filled block, into which
  the device copied its parent's partly filled block (written in place), or a fresh block when
  the new position starts one; as the device already gathered it (`_reseat`,
  BlockManager.reseat_beams);
- otherwise (`_reassign`): a parent chosen once keeps its sequence, one chosen again forks its
  block table into the sequence of a parent nobody chose (freed first): every block shared by
  reference count, the partially filled last one copied by the first of them to write into it
  while the other still holds it (block_manager.fork_shared, copy-on-write).

A beam preempted under KV pressure (recompute) holds the step back until it is computed again:
the others wait, computed, with nothing scheduled. The n best hypotheses go out at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.worker.beam_select import BeamCandidate, BeamGroup, BeamStepResult
from services.worker.ranked import Ranked, RankedChoice
from services.worker.request import Request, Sequence, SequenceStatus, TokenLogprob

if TYPE_CHECKING:
    from services.worker.scheduler import SampledToken, ScheduledSequence, Scheduler


# A beam's token entries as a chain back to the first (parent link, entry): each step extends a
# beam in O(1) (copying every beam's list each step grew with the output's length); a finished
# hypothesis unwinds its chain once.
_Entries = tuple["_Entries | None", TokenLogprob] | None


def _unwind(node: _Entries) -> tuple[TokenLogprob, ...]:
    out = []
    while node is not None:
        node, entry = node
        out.append(entry)
    return tuple(reversed(out))


@dataclass(frozen=True)
class _Hypothesis:
    score: float  # total / length ** length_penalty
    choice: RankedChoice


class BeamSearch(Ranked):
    def __init__(self, request: Request, vocab_size: int) -> None:
        sp = request.req.sampling
        self.width = sp.num_sequences
        self.length_penalty = sp.length_penalty
        self.early_stopping = sp.early_stopping
        self.user_logprobs = sp.logprobs
        # each beam's chain of per-token logprob entries, kept only when the client asked for
        # logprobs (the returned choices carry none otherwise: ranked.py)
        self.keeps_entries = sp.logprobs is not None
        num_stop = len(request.stop_token_ids)
        self.stops = tuple(sorted(request.stop_token_ids))  # (sorted once, not every step)
        self.keep = max(2, 1 + num_stop) * self.width  # transformers' beams_to_keep
        # each row's own best `keep`, plus the stop ids that min_tokens may ban
        self.candidates_per_beam = min(self.keep + num_stop, vocab_size)
        first = request.sequences[0]
        self.live: list[Sequence] = [first]
        self.scores: dict[int, float] = {first.seq_id: 0.0}
        self.entries: dict[int, _Entries] = {first.seq_id: None}
        # this step's row of each beam that was computed: its top candidates (the host merges
        # them), or None when the device selected over all beams at once (`selected`)
        self.rows: dict[int, TokenLogprob | None] = {}
        self.selected: BeamStepResult | None = None
        # the next step was launched ahead: the block each live sequence writes (hold_tail), and
        # those of them that are fresh blocks (the others are its own partly filled block)
        self.pending_tails: dict[int, int] = {}
        self.fresh_tails: list[int] = []
        # blocks the scheduler set aside at admission for forks of the prompt (parked sequences):
        # beams fork copy-on-write, so they go back, and the copy takes a block when it happens
        self.spares: list[int] = []
        self.finished: list[_Hypothesis] = []  # best first, at most `width`
        self.tops: list[tuple[tuple[int, float], ...]] = []  # this step's: each live beam's alternatives
        self.improvable = True
        self.num_steps = 0
        self.num_host_merges = 0  # steps whose candidates the host merged (not beam_select's)
        self.num_ahead = 0  # steps whose next one was launched before their candidates were read

    # ---- called by the runner ------------------------------------------------------------------
    def group(self, rows: dict[int, int], ahead: bool = False) -> BeamGroup | None:
        """The device selection's view of this request (beam_select.py), when every live beam is
        a sampling row of the step (`rows`: sequence id -> row); None when some beam is not (one
        was preempted and is computed again: its row meets the others' older rows on the host).
        `ahead`: the step was launched before the host applied the previous one (its scores come
        from the previous selection on the device, and its beams have one more token)."""
        mine = [rows.get(s.seq_id) for s in self.live]
        if any(r is None for r in mine):
            return None
        request = self.live[0].request
        generated = self.live[0].num_output_tokens + ahead
        banned = self.stops if generated < request.sampling.min_tokens else ()
        return BeamGroup(
            request.request_id,
            [r for r in mine if r is not None],
            [self.scores[s.seq_id] for s in self.live] if not ahead else [0.0] * len(self.live),
            self.keep,
            self.candidates_per_beam,
            banned,
            self.user_logprobs or 0,
            self.stops,
        )

    # ---- called by the scheduler (a step launched ahead) -------------------------------------
    def can_launch_ahead(self, sampled: set[int]) -> bool:
        """Whether the next step may be launched before this one's candidates are read: every
        live beam samples in this step (`sampled`: sequence ids), so the device selects over all
        of them and knows the next beams (beam_select.BeamSelection.parents); not at the prompt
        step (its parked sequences are forked by `_reassign`)."""
        return (
            len(self.live) == self.width
            and not self.rows
            and not self.pending_tails
            and all(s.seq_id in sampled for s in self.live)
        )

    def hold_tail(self, seq: Sequence, block: int, fresh: bool) -> None:
        """The block `seq`'s next position goes in, chosen when its step is launched ahead: the
        new beam in this slot writes there, whichever parent it turns out to have (its parent's
        partly filled block copied into it on the device first). `fresh`: a block taken for it
        (the position starts a block); else `seq`'s own partly filled block (written in place,
        BlockManager.beam_tail), which stays in its table whatever happens."""
        self.pending_tails[seq.seq_id] = block
        if fresh:
            self.fresh_tails.append(block)

    def release_tails(self, sched: Scheduler) -> None:
        """The step launched ahead is discarded (the search ended, or an abort): its fresh blocks
        go back (a partly filled block written in place goes with its sequence)."""
        for block in self.fresh_tails:
            sched.bm.release_block(block)
        self.pending_tails, self.fresh_tails = {}, []

    # ---- called by Scheduler.update ----------------------------------------------------------
    def report(self, item: ScheduledSequence, token: SampledToken) -> None:
        """A beam's row of this step: its top candidates, or (device selection) nothing, the
        whole request's candidates coming on the row of its first beam."""
        self.rows[item.seq.seq_id] = token.logprob
        if token.beam is not None:
            self.selected = token.beam
        self.spares += item.spare_blocks

    def advance(self, sched: Scheduler) -> None:
        """The step over every beam, once all of them are computed."""
        rows, running = self.rows, SequenceStatus.RUNNING
        for s in self.live:  # (a plain loop: this runs every step for every beam)
            if s.seq_id not in rows or s.status is not running or s.num_computed_tokens != len(s.token_ids):
                return  # a beam was preempted: step when it is computed again
        request = self.live[0].request
        generated = self.live[0].num_output_tokens
        length = generated + 1
        # the candidates as read back (no object per candidate made here), and each live beam's
        # top alternatives, which a candidate's logprob entry carries (`_entry`)
        if self.selected is not None:  # selected on the device over every beam (beam_select.py)
            candidates, self.tops = self.selected.candidates, self.selected.alternatives
        else:
            candidates, self.tops = self._top_candidates(request, generated)
            self.num_host_merges += 1
        at_max = length >= request.max_tokens
        hits = [at_max or c.token_id in request.stop_token_ids for c in candidates]
        self._keep_finished(request, candidates, hits, length)
        going_on = [c for c, hit in zip(candidates, hits, strict=True) if not hit][: self.width]
        if going_on:
            best_length = (
                request.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else length
            )
            best_running = going_on[0].total / best_length**self.length_penalty
            if len(self.finished) == self.width and best_running <= self.finished[-1].score:
                self.improvable = False
        full = len(self.finished) == self.width and self.early_stopping is True
        self.rows, self.selected = {}, None
        self.num_steps += 1
        if at_max or not self.improvable or full or len(going_on) < self.width:
            self._finish(sched, request)
            return
        if self.pending_tails:
            self._reseat(sched, going_on)
        else:
            self._reassign(sched, going_on)

    # ---- the step ------------------------------------------------------------------------------
    def _entry(self, c: BeamCandidate) -> TokenLogprob:
        """A candidate's token logprob entry (made for those that go on or finish, and only when
        the client asked for logprobs)."""
        return TokenLogprob(c.token_id, c.logprob, c.rank, self.tops[c.beam])

    def _top_candidates(
        self, request: Request, generated: int
    ) -> tuple[list[BeamCandidate], list[tuple[tuple[int, float], ...]]]:
        """The host merge of the beams' rows (a beam computed again after a preemption meets the
        others' rows of an earlier step); the same order as beam_select's."""
        banned = request.stop_token_ids if generated < request.sampling.min_tokens else frozenset()
        # plain tuples for the width x K numbers, objects for the K kept (the per-step host work)
        tops = []
        for seq in self.live:
            row = self.rows[seq.seq_id]
            assert row is not None, "a beam's row without a device selection carries its top"
            tops.append(row.top)
        rows = [(self.scores[seq.seq_id], top) for seq, top in zip(self.live, tops, strict=True)]
        scored = [
            (-(base + logprob), b, token_id, rank, logprob)
            for b, (base, top) in enumerate(rows)
            for rank, (token_id, logprob) in enumerate(top)
            if token_id not in banned
        ]
        scored.sort()  # best first; equal: the earlier beam, then the lower token id (beam_select's)
        kept = [
            BeamCandidate(-neg_total, b, token_id, logprob, rank + 1)
            for neg_total, b, token_id, rank, logprob in scored[: self.keep]
        ]
        return kept, tops

    def _keep_finished(
        self, request: Request, candidates: list[BeamCandidate], hits: list[bool], length: int
    ) -> None:
        """Of the first `width` candidates, those that end become hypotheses (while they can
        still matter), the best `width` kept."""
        full = len(self.finished) == self.width and self.early_stopping is True
        if full or not self.improvable:
            return
        new = []
        for c, hit in zip(candidates[: self.width], hits, strict=False):
            if not hit:
                continue
            parent = self.live[c.beam]
            stop = c.token_id if c.token_id in request.stop_token_ids else None
            choice = RankedChoice(
                token_ids=(*parent.output_token_ids, c.token_id),
                logprobs=(*_unwind(self.entries[parent.seq_id]), self._entry(c))
                if self.keeps_entries
                else (),
                cumulative_logprob=c.total,
                finish_reason="stop" if stop is not None else "length",
                stop_token_id=stop,
            )
            new.append(_Hypothesis(c.total / length**self.length_penalty, choice))
        if new:
            # stable: an earlier hypothesis stays ahead of an equal new one (transformers' merge)
            self.finished = sorted(self.finished + new, key=lambda h: -h.score)[: self.width]

    def _reassign(self, sched: Scheduler, going_on: list[BeamCandidate]) -> None:
        """Map the next beams onto the request's sequences: a chosen parent keeps its sequence
        (first child), every further child forks into the sequence of an unchosen parent, or of a
        parked one at the first step."""
        request = self.live[0].request
        chosen = {c.beam for c in going_on}
        spare_seqs = [s for b, s in enumerate(self.live) if b not in chosen] + request.parked
        claimed: set[int] = set()
        targets: list[Sequence] = []
        for c in going_on:
            parent = self.live[c.beam]
            if c.beam not in claimed:
                claimed.add(c.beam)
                targets.append(parent)
                continue
            # an unchosen beam's sequence first (parked ones hold no blocks): its table is mostly
            # the parent's, and only the entries after they part change hands
            child = spare_seqs.pop(0)
            sched.bm.refork_shared(parent, child)  # the partial block is copied when one writes into it
            child.token_ids = list(parent.token_ids)
            if child.status is SequenceStatus.PARKED:
                child.status = SequenceStatus.RUNNING
                sched.running.insert(sched.running.index(parent) + 1, child)
            targets.append(child)
        for seq in spare_seqs:  # (unused: a parked choice when fewer beams go on; none otherwise)
            sched.bm.free_sequence(seq)
        self._release_spares(sched)
        scores: dict[int, float] = {}
        entries: dict[int, _Entries] = {}
        for c, seq in zip(going_on, targets, strict=True):
            parent = self.live[c.beam]
            scores[seq.seq_id] = c.total
            if self.keeps_entries:
                entries[seq.seq_id] = (self.entries[parent.seq_id], self._entry(c))
        for c, seq in zip(going_on, targets, strict=True):
            seq.token_ids.append(c.token_id)
        self.scores, self.entries, self.live = scores, entries, targets
        _running_in_live_order(sched.running, targets)

    def _reseat(self, sched: Scheduler, going_on: list[BeamCandidate]) -> None:
        """The next step was launched ahead with new beam j in the sequence of live beam j (the
        device gathered its block table from its parent's, beam_select.BeamSelection): the host
        does the same with the sequences, each on the block it wrote (hold_tail). A beam that
        continues its own sequence (most of them) appends to its lists in place; only one moved to
        another parent copies that parent's."""
        bs = sched.bm.block_size
        live = self.live
        length = live[0].num_tokens  # the new tokens' position
        tails = [self.pending_tails[s.seq_id] for s in live]
        parents = [c.beam for c in going_on]
        moved = [j for j, p in enumerate(parents) if p != j]
        # the moved beams' token lists from the old ones, before any beam appends in place
        copies = [live[parents[j]].token_ids[:length] for j in moved]
        sched.bm.reseat_beams(live, parents, tails, length // bs, in_place=not self.fresh_tails)
        for j, tokens in zip(moved, copies, strict=True):
            live[j].token_ids = tokens
        scores: dict[int, float] = {}
        entries: dict[int, _Entries] = {}
        for seq, c in zip(live, going_on, strict=True):
            seq.token_ids.append(c.token_id)
            scores[seq.seq_id] = c.total
            if self.keeps_entries:
                entries[seq.seq_id] = (self.entries[live[c.beam].seq_id], self._entry(c))
        self.scores, self.entries, self.pending_tails, self.fresh_tails = scores, entries, {}, []
        self._release_spares(sched)
        self.num_ahead += 1

    def _finish(self, sched: Scheduler, request: Request) -> None:
        self.release_tails(sched)
        self._release_spares(sched)
        for seq in request.sequences:
            if not seq.is_finished:
                sched.finish_sequence(seq, "length")

    def _release_spares(self, sched: Scheduler) -> None:
        for block in self.spares:
            sched.bm.release_block(block)
        self.spares = []

    # ---- Ranked ------------------------------------------------------------------------------
    def best(self, request: Request) -> list[RankedChoice]:
        k = self.user_logprobs
        if k is None:
            return [h.choice for h in self.finished]
        return [_trimmed(h.choice, k) for h in self.finished]

    def completion_tokens(self, request: Request, best: list[RankedChoice]) -> int:
        return sum(len(c.token_ids) for c in best)


def _running_in_live_order(running: list[Sequence], live: list[Sequence]) -> None:
    """Put a request's live beams, in the places they take in the scheduler's running list, in
    `live` order: the step's rows are then the beams' in the order the selection reads them (no
    [N, V] gather of the rows, and the tables a step ahead gathers from are the step's own: views,
    beam_step.py). Called when the beams are placed anew (`_reassign`, no step in flight for
    them); a step launched ahead keeps each beam in its place. Only the order among the request's
    own sequences changes."""
    places = sorted(running.index(s) for s in live)
    for place, seq in zip(places, live, strict=True):
        running[place] = seq


def _trimmed(choice: RankedChoice, k: int) -> RankedChoice:
    logprobs = tuple(TokenLogprob(e.token_id, e.logprob, e.rank, e.top[:k]) for e in choice.logprobs)
    return RankedChoice(
        choice.token_ids, logprobs, choice.cumulative_logprob, choice.finish_reason, choice.stop_token_id
    )
