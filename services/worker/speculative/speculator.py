"""Speculative decoding in the engine's step: drafts for the step's decodes (before the forward),
counters and the adaptive draft length (after it).

    scheduled = scheduler.schedule()
    speculator.plan(scheduled)        # decodes get drafts: num_new_tokens = 1 + K, blocks for them
    sampled = runner.execute(scheduled)   # one forward; verify.py samples every position
    scheduler.update(...)             # kept drafts + one token appended, rejected drafts' blocks back
    speculator.observe(scheduled, sampled)

A draft never costs another request anything: it takes only free KV blocks (no preemption, no
eviction of a running sequence) and what is left of the step's token budget.

Adaptive K (per step, docs/speculative.md): with a per-draft acceptance rate a (a moving average
of kept / judged drafts, a draft after a rejected one not being judged), K drafts emit E(K) = (1 - a^(K+1)) / (1 - a) tokens per
sequence. A step over B sequences costs 1 + c * B * (K + 1) + K * d, relative to the fixed cost
of a step (weights read once): c is the cost of one more token in the forward
(--speculative-token-cost), d the cost of one draft forward (the draft model's share of the
target's parameters; 0 for prompt lookup). The K in 0..--num-speculative-tokens with the most
tokens per unit of cost wins; K = 0 (no speculation) when none beats decoding one token. While
off, one step in PROBE_EVERY speculates with K = 1 so a changed workload is noticed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from services.worker.block_manager import BlockManager
from services.worker.request import Sequence
from services.worker.scheduler import SampledToken, ScheduledSequence, SchedulerOutput
from services.worker.speculative.draft import Draft

PROBE_EVERY = 16
EMA_WEIGHT = 0.1  # weight of one verification (a drafted sequence) in the moving average
PRIOR_ACCEPTANCE = 0.6  # the average's start


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], k: int) -> list[Draft | None]: ...

    def may_propose(self, seqs: list[Sequence]) -> bool:
        """Cheaply: whether some of `seqs` would get a proposal (False lets a step run async)."""
        ...

    def release(self, seqs: Iterable[Sequence]) -> None: ...

    def after_step(self, speculating: bool) -> None:
        """After each step is applied; `speculating`: the step's K was not 0 (EAGLE's catch-up)."""
        ...


@dataclass
class SpecStats:
    """Counters since start (Info and /metrics)."""

    num_drafts: int = 0  # verification of one sequence's drafts (one per drafted sequence per step)
    num_draft_tokens: int = 0  # drafted tokens verified
    num_accepted_tokens: int = 0  # of those, kept
    num_emitted_tokens: int = 0  # tokens drafted sequences appended (kept drafts + one each)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification appends on average (kept drafts plus the bonus / corrected one)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification of K drafts emits when each is kept with probability `acceptance`."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def choose_k(acceptance: float, batch: int, max_k: int, token_cost: float, draft_cost: float) -> int:
    """The draft length with the most tokens per unit of step cost (0: do not speculate)."""
    best_k, best = 0, 1.0 / (1.0 + token_cost * batch)
    for k in range(1, max_k + 1):
        rate = expected_tokens(acceptance, k) / (1.0 + token_cost * batch * (k + 1) + k * draft_cost)
        if rate > best:
            best_k, best = k, rate
    return best_k


class Speculator:
    def __init__(
        self,
        proposer: Proposer,
        block_manager: BlockManager,
        num_speculative_tokens: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        adaptive: bool,
        token_cost: float,
        draft_cost: float,
    ) -> None:
        self.proposer = proposer
        self.bm = block_manager
        self.max_k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adaptive = adaptive
        self.token_cost = token_cost
        self.draft_cost = draft_cost
        self.acceptance = PRIOR_ACCEPTANCE
        self.steps_off = 0
        self.probe_due = False
        self.last_k = num_speculative_tokens
        self.decided_k = 0  # the last `decide`'s answer
        self.stats = SpecStats()

    def decide(self, batch: int) -> int:
        """The next step's K for `batch` running sequences (0: a plain step, which the engine may
        run with async scheduling). A probe stays due until a step with drafts is planned."""
        self.decided_k = self._decide(batch)
        return self.decided_k

    def _decide(self, batch: int) -> int:
        if not self.adaptive:
            return self.max_k
        k = choose_k(self.acceptance, batch, self.max_k, self.token_cost, self.draft_cost)
        if k:
            self.steps_off = 0
            return k
        if not self.probe_due:
            self.steps_off += 1
            self.probe_due = self.steps_off >= PROBE_EVERY
        return 1 if self.probe_due else 0

    def may_propose(self, seqs: list[Sequence]) -> bool:
        return self.proposer.may_propose(seqs)

    def plan(self, out: SchedulerOutput, k: int) -> None:
        """Give the step's plain decodes drafts of up to `k` tokens (in place)."""
        candidates = [item for item in out.scheduled if _can_draft(item)]
        self.last_k = k
        if not candidates or k == 0:
            return
        if self.probe_due:
            self.probe_due, self.steps_off = False, 0
        drafts = self.proposer.propose([item.seq for item in candidates], k)
        budget = self.max_num_batched_tokens - out.num_batched_tokens
        for item, draft in zip(candidates, drafts, strict=True):
            if draft is None or budget <= 0:
                continue
            draft = self._fit(item.seq, draft, budget)
            if draft is None or not self.bm.can_allocate(item.seq, 1 + draft.k):
                continue
            self.bm.allocate(item.seq, 1 + draft.k)
            item.num_new_tokens = 1 + draft.k
            item.draft = draft
            out.num_batched_tokens += draft.k
            budget -= draft.k

    def _fit(self, seq: Sequence, draft: Draft, budget: int) -> Draft | None:
        """`draft` cut to what may be verified: the budget, max_tokens (the step appends up to
        K + 1 tokens), the context length, before a stop token (it ends the output: the target
        gives it as the token after the kept drafts), and to what a guided sequence's grammar allows."""
        request = seq.request
        k = min(
            draft.k,
            budget,
            request.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - seq.num_tokens,
        )
        tokens = draft.token_ids[: max(k, 0)]
        stop = next((j for j, t in enumerate(tokens) if t in request.stop_token_ids), None)
        if stop is not None:
            tokens = tokens[:stop]
        masks = None
        if seq.guided is not None and tokens:
            tokens, masks = _grammar_prefix(seq, tokens)
        if not tokens:
            return None
        probs = draft.probs[: len(tokens)] if draft.probs is not None else None
        return Draft(tokens, probs, masks)

    def observe(self, out: SchedulerOutput, sampled: list[list[SampledToken]]) -> None:
        """Count the step's verifications and update the acceptance average."""
        kept = trials = verified = 0  # drafts kept; drafts judged (verification stops at the first rejection)
        for item, tokens in zip(out.scheduled, sampled, strict=True):
            if item.draft is None or not tokens:
                continue
            accepted = min(len(tokens) - 1, item.draft.k)
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += item.draft.k
            self.stats.num_accepted_tokens += accepted
            self.stats.num_emitted_tokens += len(tokens)
            kept += accepted
            trials += accepted + (accepted < item.draft.k)
            verified += 1
        if trials:
            # kept / judged estimates the chance a draft is kept (kept / drafted would count the
            # drafts after a rejection, never judged, as rejected)
            weight = 1.0 - (1.0 - EMA_WEIGHT) ** verified
            self.acceptance += weight * (kept / trials - self.acceptance)

    def release(self, seqs: Iterable[Sequence]) -> None:
        self.proposer.release(seqs)

    def after_step(self) -> None:
        self.proposer.after_step(self.decided_k > 0)


def _can_draft(item: ScheduledSequence) -> bool:
    """A plain decode: it samples its next token from its last one, nothing else rides on the row."""
    seq = item.seq
    return (
        item.sample
        and item.num_new_tokens == 1
        and item.start == seq.num_tokens - 1
        and not item.children
        and not item.pending_tokens
        and item.prompt_logprob_positions is None
        and not seq.request.req.hold_kv
        and seq.num_output_tokens > 0
        and seq.request.beam is None  # (a beam's next token is the beam step's pick: beam_search.py)
    )


def _grammar_prefix(seq: Sequence, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """The longest prefix of `tokens` the sequence's grammar allows (stopping before a token that
    completes the output), and the mask after each kept prefix (K + 1 masks). The sequence's own
    matcher is untouched: a copy consumes the drafts."""
    state = seq.guided
    assert state is not None
    masks = [state.mask]
    kept: list[int] = []
    twin = state.fork()
    for t in tokens:
        word = int.from_bytes(masks[-1][(t >> 5) * 4 : (t >> 5) * 4 + 4], "little")
        if not word >> (t & 31) & 1:
            break
        twin.consume(t)
        if twin.needs_mask:
            state.grammar.compiler.refresh_masks([twin])
        if twin.error is not None or twin.complete:
            break
        kept.append(t)
        masks.append(twin.mask)
    return kept, masks
