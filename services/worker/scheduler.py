"""Continuous batching with chunked prefill, token by token budget (pure Python, no device work).

Each step hands out at most `max_num_batched_tokens` tokens. Running sequences go first, oldest
first; a running sequence still prefilling gets only what is left after reserving one token for
every decode behind it, so decodes are never starved by a long prompt. Waiting sequences are then
admitted, their prompts chunked to the remaining budget, while no running sequence had to be
preempted this step.

Admission is fair between groups (a group = the prompts of one gateway request, `group_id`):
the next sequence admitted is the oldest waiting one of the group with the fewest running
sequences, first come, first served between equals. So a request with hundreds of prompts does
not queue a small request behind all of them; and when a group with nothing running cannot be
admitted for lack of sequence slots or KV blocks, the newest sequences of a group holding a large
share of the slots are preempted (by recompute, below) to make room for it.

When the KV cache runs out, the newest running sequence is preempted. With a host tier
(--kv-offload-memory, kv_offload.py) that has room, by swap: its computed KV is copied to host
memory, its blocks are freed, and when it is admitted again it gets fresh blocks and the KV is
copied back (enqueued before the step's forward), computing only what it had not. Otherwise by
recompute: its blocks are freed and it goes back with its tokens so far (prompt + output), to be
prefilled again later (largely from the prefix cache when its blocks survived). Either way it
goes to the front of the queue.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from services.worker.beam_select import BeamStepResult
from services.worker.block_manager import BlockManager
from services.worker.request import Request, Sequence, SequenceStatus, TokenLogprob
from services.worker.speculative.draft import Draft

if TYPE_CHECKING:
    import torch

# A group holding more than max_num_seqs // LARGE_GROUP_DIVISOR running sequences is preempted
# to admit a group with nothing running that does not fit.
LARGE_GROUP_DIVISOR = 8


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first position computed this step (= num_computed_tokens when scheduled)
    num_new_tokens: int  # tokens [start, start + num_new_tokens) are computed this step
    sample: bool  # this step computes the last token, so the next one is sampled
    children: list[Sequence] = field(default_factory=list)  # parked choices sampled from the same row
    spare_blocks: list[int] = field(default_factory=list)  # one per child, for the copied partial block
    # positions [lo, hi) whose logits give prompt logprobs (of tokens lo+1 .. hi); filled by the runner:
    prompt_logprob_positions: tuple[int, int] | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Async scheduling: sampled tokens of the previous step that the host has not read yet (0 or 1);
    # the input id of this entry is then that step's sampled token, taken from the device.
    pending_tokens: int = 0
    # Pooling requests: the normalised hidden state of the last prompt token ([hidden_size] float32
    # on the device), filled by the runner when this step computes it (`sample`).
    embedding: torch.Tensor | None = None
    # Speculative decoding: K proposed tokens computed after the last one (num_new_tokens = 1 + K);
    # the step appends the kept ones and one more (speculative/verify.py)
    draft: Draft | None = None
    # Beam search launched ahead (beam_search.py): the block this live beam's slot writes its
    # next position into (its own partly filled block, or a fresh one; -1: none); its input id,
    # parent and table come from the previous
    # step's selection on the device
    beam_tail: int = -1


class _Admission(NamedTuple):
    has_kv: bool  # the sequence holds its prompt's KV already (fetched from a prefill worker)
    cached: list[int]  # prefix-cache blocks it takes
    num_new: int  # tokens computed this step
    extra: int  # spare blocks for its parked choices
    blocks: int  # free blocks it takes (new, revived cached ones, spares)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    block_copies: list[tuple[int, int]]  # (src, dst) block copies to do before the forward
    num_batched_tokens: int
    num_preempted: int
    # A continuation (schedule_continuation): for each entry, the row of the previous step's sampled
    # tokens that is its input id (one token), or -1 where the input ids come from the host (prompt
    # chunks). None for an ordinary step (input ids from the host).
    prev_rows: list[int] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None
    # beam search selected on the device: its request's candidates, on the row of its first live
    # beam (beam_select.py); None otherwise
    beam: BeamStepResult | None = None


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, max_loras: int = 0
    ) -> None:
        self.bm = block_manager
        # Distinct LoRA adapters one step may apply (the device pool's slots; 0: LoRA off)
        self.max_loras = max_loras
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0
        self.num_prefills = 0  # prompts computed here (first admissions; not fetched ones)
        # requests whose guided decoding failed in `update`; the engine aborts them (take_failed)
        self.failed: list[Request] = []
        self._guided_pending: list[Sequence] = []  # guided sequences whose next mask is stale
        # Beam steps may be launched ahead (async scheduling): off in a parallel group (the ranks
        # get host block tables) and with sliding windows (beams' leading blocks freed)
        self.beams_ahead = True
        self.num_beam_steps_ahead = 0  # beam-search sequences' steps launched ahead

    # ---- queue management ----------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request.sequences[0])

    def abort(self, request: Request) -> None:
        if request.beam is not None:
            request.beam.release_tails(self)
        for seq in request.sequences:
            if seq.is_finished:
                continue
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
            self._finish(seq, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)

    # ---- schedule ------------------------------------------------------------------------------
    def schedule(self, busy: Collection[Request] = (), max_requests: int = 0) -> SchedulerOutput:
        """The next step. A pipeline-parallel group with batches in flight (engine.py) schedules
        each batch around the others: the sequences of `busy` requests (in a batch in flight) are
        neither scheduled nor preempted, and with `max_requests` > 0 the batch takes the
        sequences of at most that many requests (so that the batches in flight share them)."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        num_preempted = 0
        num_made_room = self._make_room_for_starved_group(busy)
        decodes_left = sum(
            1 for s in self.running if s.num_tokens - s.num_computed_tokens == 1 and s.request not in busy
        )
        adapters: set[int] = set()  # LoRA adapters of this step (the pool has max_loras slots)
        requests: set[Request] = set()  # (counted only with max_requests)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.request in busy:
                i += 1
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            is_decode = remaining == 1
            if is_decode:
                decodes_left -= 1
            num_new = min(remaining, budget - (0 if is_decode else decodes_left))
            if (
                num_new <= 0
                or not self._adapter_fits(seq, adapters)
                or self._full(requests, seq, max_requests)
            ):
                i += 1
                continue
            extra = self._fork_blocks_needed(seq, num_new)
            while not self.bm.can_allocate(seq, num_new, extra=extra):
                # the newest running sequence not in flight (`seq` itself at worst)
                victim = next(s for s in reversed(self.running) if s.request not in busy)
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            scheduled.append(self._commit(seq, num_new, extra))
            adapters.add(seq.request.lora_id)
            requests.add(seq.request)
            budget -= num_new
            i += 1

        running_per_group = Counter(s.request.group for s in self.running)
        slots = self._slots_taken() if self.waiting else 0  # (only admissions read it)
        while self.waiting and budget > 0 and not num_preempted:
            index = self._next_waiting(running_per_group)
            seq = self.waiting[index]
            n_parked = len(seq.request.parked)
            if slots + 1 + n_parked > self.max_num_seqs:
                break
            if not self._adapter_fits(seq, adapters):
                break
            # (a preempted beam or choice of a request with others in flight waits for them)
            if seq.request in busy or self._full(requests, seq, max_requests):
                break
            admission = self._admission(seq, budget)
            if admission is None:
                break
            del self.waiting[index]
            adapters.add(seq.request.lora_id)
            requests.add(seq.request)
            scheduled.append(self._admit(seq, admission))
            running_per_group[seq.request.group] += 1 + n_parked
            slots += 1 + n_parked
            budget -= admission.num_new

        copies, self._pending_copies = self._pending_copies + self.bm.take_copies(), []
        return SchedulerOutput(
            scheduled, copies, self.max_num_batched_tokens - budget, num_preempted + num_made_room
        )

    @staticmethod
    def _full(requests: set[Request], seq: Sequence, max_requests: int) -> bool:
        """Whether a batch holding `requests` has no room for `seq`'s request (`schedule`)."""
        return bool(max_requests) and seq.request not in requests and len(requests) >= max_requests

    def schedule_continuation(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Async scheduling: the step after `prev`, planned while `prev` still runs on the device and
        before its tokens are known, assuming every sequence of `prev` goes on: what sampled decodes
        on (its input id is the token `prev` samples, read on the device: `prev_rows`), what is in
        the middle of its prompt gets its next chunk, and waiting sequences are admitted with the
        budget left, exactly as `schedule()` would once `prev`'s tokens are applied. A beam-search
        request whose beams all sample in `prev` goes on too: each beam's sequence writes its own
        partly filled block in place, or takes a fresh block when its next position starts one
        (beam_search.py); its input id and table come from `prev`'s selection on the device.
        Returns None where that is not known without the tokens (forks, prompt logprobs, guided
        decoding, and penalties need the token values on the host) or would take a preemption (a
        KV cache that cannot take every sequence); the caller then reads `prev` first and
        schedules as usual.

        Blocks that `prev`'s finishing sequences free are only counted by the next `schedule()`: an
        admission may come one step later than a synchronous scheduler would make it.

        Sequences that `prev` finishes by length (or hands to a KV handle) are left out; those that
        stop on the token `prev` samples (or are aborted meanwhile) are computed anyway and their
        results discarded by the caller: their blocks, the one allocated here included, are freed
        when they finish, and a finished sequence's update is skipped."""
        if self._pending_copies or not prev.scheduled:
            return None
        sampled = {item.seq.seq_id for item in prev.scheduled if item.sample}
        checked: set[Request] = set()  # (the request's checks once, not once per sequence)
        for item in prev.scheduled:
            if item.children or item.prompt_logprob_positions:
                return None
            request = item.seq.request
            if request not in checked:
                checked.add(request)
                # (parked choices: the chunk that ends the prompt forks them, which `_commit` plans)
                if request.parked:
                    return None
                # beam search: the next beams are the device selection's (beam_select.py) when
                # every beam of the request samples in `prev`
                beam = request.beam
                if beam is not None and not (self.beams_ahead and beam.can_launch_ahead(sampled)):
                    return None
            # Guided decoding: the next step's mask needs the token `prev` samples, so a step with a
            # guided sequence is never launched ahead. Correctness first: the matcher must consume
            # token N before mask N+1 exists, and llguidance runs on the host.
            if item.seq.guided is not None:
                return None
        live = [item.seq for item in prev.scheduled if not item.seq.is_finished]
        if len(live) != len(self.running) or any(a is not b for a, b in zip(live, self.running, strict=True)):
            return None
        # (prev entry, its row of prev's sampled tokens or -1, tokens it computes now)
        plan: list[tuple[ScheduledSequence, int, int]] = []
        sample_row = 0
        for item in prev.scheduled:
            row = sample_row if item.sample else -1
            sample_row += item.sample
            seq = item.seq
            if seq.is_finished:
                continue
            assert seq.num_computed_tokens == item.start, (seq, item.start)
            request = seq.request
            if item.sample:
                # `prev` appends one token: the host holds every earlier one (one step is unread).
                if (
                    request.req.hold_kv
                    or request.req.pooling
                    or seq.num_output_tokens + 1 >= request.max_tokens
                ):
                    continue
                sp = request.sampling
                if sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
                    return None
            plan.append((item, row, 1))
        # The token budget, as `schedule()` hands it out: decodes one token each, in running order; a
        # sequence in the middle of its prompt gets what is left after one token per decode behind it.
        budget = self.max_num_batched_tokens
        decodes_left = sum(1 for item, row, _ in plan if row >= 0)
        needed = 0
        own_tails: dict[int, int | None] = {}  # plan index of a beam -> its own partly filled block
        for i, (item, row, _) in enumerate(plan):
            done = item.start + item.num_new_tokens  # computed once `prev` completes
            if row >= 0:
                decodes_left -= 1
                num_new = 1
            else:
                num_new = min(item.seq.num_tokens - done, budget - decodes_left)
            if num_new <= 0:
                return None  # schedule() would skip it this step: keep it simple, go synchronous
            plan[i] = (item, row, num_new)
            budget -= num_new
            if item.seq.request.beam is not None:
                # its own partly filled block, or a fresh one where its next position starts a
                # block (BeamSearch.hold_tail)
                own_tails[i] = own = self.bm.beam_tail(item.seq, done)
                needed += own is None
            else:
                needed += self.bm.blocks_needed(item.seq, item.num_new_tokens + num_new)
        if not plan or budget < 0 or needed > self.bm.num_free_blocks:
            return None
        if self.waiting:
            # Fair admission out of arrival order, or preemption for a starved group: schedule().
            running_per_group = Counter(s.request.group for s in self.running)
            if self._next_waiting(running_per_group) != 0 or self._room_taker() is not None:
                return None
        # How many waiting sequences schedule() would admit beside these (counted, nothing taken).
        admits, reserved, left = 0, needed, budget
        slots = self._slots_taken() if self.waiting else 0
        for seq in self.waiting:
            if left <= 0 or slots + admits + 1 + len(seq.request.parked) > self.max_num_seqs:
                break
            admission = self._admission(seq, left, reserved)
            if admission is None:
                break
            if seq.request.parked or seq.request.wants_prompt_logprobs or seq.guided is not None:
                return None  # admitted with what a continuation does not do: go synchronous
            admits, reserved, left = admits + 1, reserved + admission.blocks, left - admission.num_new
        adapters = {item.seq.request.lora_id for item, _, _ in plan}
        adapters |= {s.request.lora_id for s in itertools.islice(self.waiting, admits)}
        if self.max_loras and len(adapters - {0}) > self.max_loras:
            return None  # schedule() picks which adapters run this step
        scheduled: list[ScheduledSequence] = []
        rows: list[int] = []
        for i, (item, row, num_new) in enumerate(plan):
            seq = item.seq
            start = item.start + item.num_new_tokens
            beam = seq.request.beam
            if beam is not None:  # (always a decode: its input id is the selection's, not a row's)
                own = own_tails[i]  # its partly filled block, written in place
                tail = own if own is not None else self.bm.allocate_block()
                beam.hold_tail(seq, tail, fresh=own is None)
                self.num_beam_steps_ahead += 1
                scheduled.append(ScheduledSequence(seq, start, 1, True, pending_tokens=1, beam_tail=tail))
                rows.append(-1)
                continue
            self.bm.allocate(seq, item.num_new_tokens + num_new)
            pending = 1 if row >= 0 else 0
            sample = start + num_new == seq.num_tokens + pending
            scheduled.append(ScheduledSequence(seq, start, num_new, sample, pending_tokens=pending))
            rows.append(row)
        # Admit them (the lookups again: the allocations above may have reused free cached blocks).
        for _ in range(admits):
            admission = self._admission(self.waiting[0], budget)
            if admission is None:
                break
            scheduled.append(self._admit(self.waiting.popleft(), admission))
            rows.append(-1)
            budget -= admission.num_new
        copies = (
            self.bm.take_copies()
        )  # (copy-on-write of shared partial blocks: none from a continuation's own)
        return SchedulerOutput(scheduled, copies, self.max_num_batched_tokens - budget, 0, prev_rows=rows)

    def _adapter_fits(self, seq: Sequence, adapters: set[int]) -> bool:
        """Whether `seq` may join a step applying `adapters` (its own is one of them, or a slot is left)."""
        lora_id = seq.request.lora_id
        return not lora_id or lora_id in adapters or len(adapters - {0}) < self.max_loras

    def _slots_taken(self) -> int:
        """Sequence slots in use (--max-num-seqs): the running sequences and the parked choices
        that fork from them when their prompt is done. O(running x choices per request): asked
        only when something waits to be admitted."""
        return len(self.running) + sum(len(s.request.parked) for s in self.running)

    def _next_waiting(self, running_per_group: Counter[str]) -> int:
        """Index in `waiting` of the sequence to admit next: the oldest of the group with the
        fewest running sequences (FIFO between equals)."""
        if not running_per_group[self.waiting[0].request.group]:
            return 0  # nothing of its group runs: nobody is ahead of it (the usual case)
        best, best_count = 0, running_per_group[self.waiting[0].request.group]
        seen: set[str] = set()
        for i, seq in enumerate(self.waiting):
            group = seq.request.group
            if group in seen:
                continue
            seen.add(group)
            count = running_per_group[group]
            if count < best_count:
                best, best_count = i, count
                if not count:
                    break
        return best

    def _room_taker(self) -> tuple[Sequence, str] | None:
        """The next waiting sequence and the group to preempt for it, when it belongs to a group
        with nothing running, does not fit (sequence slots or KV blocks), and another group holds
        more sequences than it needs; else None."""
        if not self.waiting or not self.running:
            return None
        running_per_group = Counter(s.request.group for s in self.running)
        seq = self.waiting[self._next_waiting(running_per_group)]
        if running_per_group[seq.request.group]:
            return None
        group, count = running_per_group.most_common(1)[0]
        # Preempting costs a recompute or a swap: only a group holding a large share of the slots (one
        # that can starve the others) gives way, not the ordinary mix of n > 1 requests.
        if count <= max(1 + len(seq.request.parked), self.max_num_seqs // LARGE_GROUP_DIVISOR):
            return None
        fits_slots = self._slots_taken() + 1 + len(seq.request.parked) <= self.max_num_seqs
        if fits_slots and self._admission(seq, self.max_num_batched_tokens) is not None:
            return None
        return seq, group

    def _make_room_for_starved_group(self, busy: Collection[Request] = ()) -> int:
        """Preempt the newest running sequences of the group holding the most while `_room_taker`
        says so (none of `busy` requests, in a batch in flight). Done before anything is
        scheduled (a preempted sequence must not be in this step). Returns how many were
        preempted."""
        preempted = 0
        while (taker := self._room_taker()) is not None:
            _, group = taker
            victim = next(
                (s for s in reversed(self.running) if s.request.group == group and s.request not in busy),
                None,
            )
            if victim is None:  # the group's sequences are all in flight: once they are back
                break
            self._preempt(victim)
            preempted += 1
        return preempted

    def _admission(self, seq: Sequence, budget: int, reserved: int = 0) -> _Admission | None:
        """How waiting `seq` would be admitted with `budget` tokens left, or None when the KV cache
        (less `reserved` blocks) cannot take it."""
        # A sequence whose prompt KV was fetched from a prefill worker already holds its blocks.
        has_kv = bool(seq.block_ids)
        # prompt logprobs need the logits of every prompt position: compute, do not reuse; a
        # swapped-out sequence brings its own KV back
        reuse = not (has_kv or seq.swapped is not None or seq.request.wants_prompt_logprobs)
        cached = self.bm.find_cached_prefix(seq) if reuse else []
        computed = max(seq.num_computed_tokens, len(cached) * self.bm.block_size)
        num_new = min(seq.num_tokens - computed, budget)
        extra = self._fork_blocks_needed(seq, num_new, computed)
        blocks = self.bm.free_blocks_taken(seq, num_new, cached, extra)
        if blocks + reserved > self.bm.num_free_blocks:
            return None
        return _Admission(has_kv, cached, num_new, extra, blocks)

    def _admit(self, seq: Sequence, admission: _Admission) -> ScheduledSequence:
        """Waiting `seq` (just taken off the queue) starts running: its prefix-cache blocks, then
        its first chunk."""
        request = seq.request
        if request.num_cached_prompt_tokens is None:
            self.num_prefills += 1
            hit = min(len(admission.cached) * self.bm.block_size, request.prompt_len)
            request.num_cached_prompt_tokens = hit
            self.bm.record_lookup(request.prompt_len, hit)
        if seq.swapped is not None:
            self.bm.swap_in(seq)
        elif not admission.has_kv:
            self.bm.use_cached_prefix(seq, admission.cached)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return self._commit(seq, admission.num_new, admission.extra)

    def _fork_blocks_needed(self, seq: Sequence, num_new: int, computed: int | None = None) -> int:
        """Spare blocks the parked siblings of `seq` need when this chunk ends its prompt."""
        computed = seq.num_computed_tokens if computed is None else computed
        parked = seq.request.parked
        if not parked or computed + num_new < seq.num_tokens or seq.num_tokens % self.bm.block_size == 0:
            return 0
        return len(parked)

    def _commit(self, seq: Sequence, num_new: int, extra: int) -> ScheduledSequence:
        self.bm.allocate(seq, num_new)
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        children = seq.request.parked if sample else []
        spares = [self.bm.allocate_block() for _ in range(extra)]
        item = ScheduledSequence(seq, seq.num_computed_tokens, num_new, sample, children, spares)
        request = seq.request
        if request.wants_prompt_logprobs and seq is request.sequences[0]:
            lo = max(item.start, len(request.prompt_logprobs))
            hi = min(item.start + num_new, request.prompt_len - 1)
            if hi > lo:
                item.prompt_logprob_positions = (lo, hi)
        return item

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        # Beams share blocks copy-on-write and are re-ranked every step: recomputed, never swapped.
        swapped = seq.request.beam is None and self.bm.swap_out(seq)
        if not swapped:  # no host tier, no room in it, or a beam: recompute
            self.bm.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- update --------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: list[list[SampledToken]]) -> set[Request]:
        """Advance the scheduled sequences; `sampled[i]` holds the tokens of `out.scheduled[i]`
        (empty when it did not sample; else its own then one per child). Returns touched requests."""
        touched: set[Request] = set()
        beams: dict[Request, None] = {}  # beam-search requests with a beam computed this step
        for item, tokens in zip(out.scheduled, sampled, strict=True):
            seq = item.seq
            touched.add(seq.request)
            if seq.is_finished:  # aborted while the step ran
                continue
            if item.draft is not None:
                self._update_drafted(item, tokens)
                continue
            seq.num_computed_tokens = item.start + item.num_new_tokens
            seq.request.prompt_logprobs += item.prompt_logprobs
            self.bm.register_computed_blocks(seq)
            self.bm.free_out_of_window(seq)
            if not item.sample:
                continue
            if seq.request.req.pooling:  # its prompt is computed: the embedding is the result
                seq.request.embedding = item.embedding
                self._finish_running(seq, "stop")
                continue
            beam = seq.request.beam
            if beam is not None:  # the beam step picks every beam's next token at once (beam_search.py)
                beam.report(item, tokens[0])
                beams[seq.request] = None
                continue
            spares: list[int | None] = list(item.spare_blocks) or [None] * len(item.children)
            for child, spare, token in zip(item.children, spares, tokens[1:], strict=True):
                copy = self.bm.fork(seq, child, spare)
                if copy is not None:
                    self._pending_copies.append(copy)
                child.status = SequenceStatus.RUNNING
                self.running.insert(self.running.index(seq) + 1, child)
                self._append(child, token)
            self._append(seq, tokens[0])
        for request in beams:
            request.beam.advance(self)
        if self._guided_pending:
            self._refresh_guided()
        return touched

    def _update_drafted(self, item: ScheduledSequence, tokens: list[SampledToken]) -> None:
        """A verified sequence appends the drafts it kept and one more token: their KV (the kept
        drafts') is computed; the blocks that only held rejected drafts go back."""
        seq = item.seq
        request = seq.request
        seq.num_computed_tokens = item.start + 1
        self.bm.register_computed_blocks(seq)
        tokens = tokens[: request.max_tokens - seq.num_output_tokens]
        for token in tokens:
            self._append(seq, token)
            if seq.is_finished:
                return
        seq.num_computed_tokens = item.start + len(tokens)  # the last appended token has no KV yet
        self.bm.register_computed_blocks(seq)
        self.bm.trim(seq)

    def _append(self, seq: Sequence, token: SampledToken) -> None:
        seq.token_ids.append(token.token_id)
        seq.new_token_ids.append(token.token_id)
        if token.logprob is not None:
            seq.new_logprobs.append(token.logprob)
        request = seq.request
        guided = seq.guided
        if token.token_id in request.stop_token_ids and seq.num_output_tokens >= request.sampling.min_tokens:
            seq.stop_token_id = token.token_id
            self._finish_running(seq, "stop")
            return
        if guided is not None:
            guided.consume(token.token_id)
            if guided.needs_mask:  # finished or not once its next mask is known (end of update)
                if seq not in self._guided_pending:  # (a verified sequence appends several)
                    self._guided_pending.append(seq)
                return
        self._finish_if_done(seq)

    def _refresh_guided(self) -> None:
        """The next masks of the guided sequences that took a token this update, computed together
        (llguidance's executor uses several cores); then their finish checks."""
        pending, self._guided_pending = self._guided_pending, []
        guided = [seq.guided for seq in pending if seq.guided is not None]
        guided[0].grammar.compiler.refresh_masks(guided)
        for seq in pending:
            self._finish_if_done(seq)

    def _finish_if_done(self, seq: Sequence) -> None:
        request = seq.request
        guided = seq.guided
        if guided is not None and guided.error is not None:
            request.error = f"guided decoding failed: {guided.error}"
            self.failed.append(request)
            self._finish_running(seq, "abort")
        elif guided is not None and guided.complete:
            # The output is complete and nothing but an end token may follow: stop now (also on
            # the max_tokens-th token, as an EOS there would).
            self._finish_running(seq, "stop")
        elif seq.num_output_tokens >= request.max_tokens:
            self._finish_running(seq, "length")
        elif request.req.hold_kv:
            # Prefill only: done after the first token; the engine hands the blocks to a KV handle.
            self.running.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "prefilled"

    # ---- disaggregated decode: prompts whose KV a prefill worker sends (kv_transfer.py) --------
    def reserve_fetch(self, request: Request) -> bool:
        """Give a new `request` blocks for its whole prompt (its own prefix cache first) to receive
        the prompt's KV into; it then waits FETCHING, in no queue. False (nothing changed) when
        the KV cache has too few free blocks."""
        seq = request.sequences[0]
        prompt_len = request.prompt_len
        cached = self.bm.find_cached_prefix(seq)[: prompt_len // self.bm.block_size]
        cached_tokens = len(cached) * self.bm.block_size
        if not self.bm.can_allocate(seq, prompt_len - cached_tokens, cached):
            return False
        self.bm.use_cached_prefix(seq, cached)
        self.bm.allocate(seq, prompt_len - cached_tokens)
        seq.status = SequenceStatus.FETCHING
        request.num_cached_prompt_tokens = cached_tokens
        self.bm.record_lookup(prompt_len, cached_tokens)
        return True

    def add_fetched(self, request: Request) -> None:
        """A FETCHING request's prompt KV is all in place: it waits to decode, its prompt computed."""
        seq = request.sequences[0]
        # Without a first token from the prefill worker (n > 1, best_of, beam search: each choice
        # samples its own) the last prompt token is computed again here, one token, for the logits
        # they all sample from; its children then fork the fetched blocks (fan_out.py).
        first_token_given = seq.num_tokens > request.prompt_len
        seq.num_computed_tokens = request.prompt_len if first_token_given else request.prompt_len - 1
        seq.status = SequenceStatus.WAITING
        self.bm.register_computed_blocks(seq)
        self.add(request)

    def add_unfetched(self, request: Request) -> None:
        """A FETCHING request's fetch failed: its blocks go back and it waits to compute its prompt."""
        seq = request.sequences[0]
        self.bm.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        request.num_cached_prompt_tokens = None
        self.add(request)

    def take_failed(self) -> list[Request]:
        failed, self.failed = self.failed, []
        return failed

    def finish_sequence(self, seq: Sequence, reason: str) -> None:
        """End `seq` wherever it is (running, waiting or parked) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def _finish_running(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.bm.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
