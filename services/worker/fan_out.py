"""One prompt, many sequences, the n best returned: `best_of` and beam search (beam_search.py).

Every sequence of a request shares the prompt's KV: choice 0 computes the prompt once, the others
are parked until then and fork its block table (block_manager.py: reference counts, only the
partially filled last block is copied, since each fork writes its own next token into it). That
is also how plain n > 1 runs; what this module adds is the choice of which sequences are returned.

A ranked request (`SamplingParams.is_ranked`) says nothing while it runs: the best are known only
when every sequence has finished. Then its n best go out in one output, ranked (index
first_choice_index + rank), each with its cumulative logprob:

- best_of > n: best_of candidates sampled as usual (their own seeds' draws per choice index), the
  n with the highest cumulative logprob (of the model's distribution, as the logprobs field
  reports it) returned, as OpenAI and vLLM define best_of. Usage counts every candidate's tokens
  (they were all generated) and the prompt once.
- beam search: the beams' finished hypotheses, best length-penalised score first (beam_search.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.worker.outputs import ChoiceOutput, RequestOutput, Usage
from services.worker.request import Request, TokenLogprob


@dataclass(frozen=True)
class RankedChoice:
    """One returned choice of a ranked request: its whole output."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]  # parallel to token_ids (empty when not asked for)
    cumulative_logprob: float
    finish_reason: str
    stop_token_id: int | None


class Ranked:
    """What picks the returned choices of a request; subclasses say how (`best`)."""

    def best(self, request: Request) -> list[RankedChoice]:
        raise NotImplementedError

    def completion_tokens(self, request: Request, best: list[RankedChoice]) -> int:
        return request.num_completion_tokens

    def output(self, request: Request) -> RequestOutput:
        """Nothing until every sequence is done; then the n best, ranked, and the usage."""
        if not request.is_finished:
            return RequestOutput(request.request_id, ())
        want_logprobs = request.req.sampling.logprobs is not None
        first = request.req.first_choice_index
        if request.error is not None or any(s.finish_reason == "abort" for s in request.sequences):
            best: list[RankedChoice] = []
            choices = tuple(
                ChoiceOutput(first + i, (), () if want_logprobs else None, "abort")
                for i in range(request.req.sampling.n)
            )
        else:
            best = self.best(request)[: request.req.sampling.n]
            choices = tuple(
                ChoiceOutput(
                    index=first + rank,
                    token_ids=c.token_ids,
                    logprobs=c.logprobs if want_logprobs else None,
                    finish_reason=c.finish_reason,
                    stop_token_id=c.stop_token_id,
                    cumulative_logprob=c.cumulative_logprob,
                )
                for rank, c in enumerate(best)
            )
        usage = Usage(
            request.prompt_len, self.completion_tokens(request, best), request.num_cached_prompt_tokens or 0
        )
        return RequestOutput(request.request_id, choices, True, usage, error=request.error)


class BestOf(Ranked):
    """best_of > n: the sequences sample as n > 1 choices do; the n most likely are returned."""

    def __init__(self, user_logprobs: int | None) -> None:
        self.user_logprobs = user_logprobs

    def best(self, request: Request) -> list[RankedChoice]:
        candidates = []
        for seq in request.sequences:
            lps = seq.new_logprobs  # never flushed: a ranked request sends nothing before the end
            total = sum(lp.logprob for lp in lps)
            kept = tuple(self._trim(lp) for lp in lps) if self.user_logprobs is not None else ()
            reason = seq.finish_reason or "abort"
            candidates.append(
                (
                    total,
                    seq.choice_index,
                    RankedChoice(tuple(seq.new_token_ids), kept, total, reason, seq.stop_token_id),
                )
            )
        candidates.sort(key=lambda c: (-c[0], c[1]))  # most likely first; equal: lower choice index
        return [c for _, _, c in candidates]

    def _trim(self, lp: TokenLogprob) -> TokenLogprob:
        assert self.user_logprobs is not None
        return dataclasses.replace(lp, top=lp.top[: self.user_logprobs])


def attach(request: Request, vocab_size: int) -> None:
    """Give a best_of / beam-search request its Ranked, and the sampling it runs with inside the
    engine: the logprobs it ranks by (beam search: each beam's top candidates), whatever the
    client asked for (its own `logprobs` stays in request.req.sampling)."""
    sp = request.sampling
    if sp.use_beam_search:
        from services.worker.beam_search import BeamSearch

        beam = BeamSearch(request, vocab_size)
        request.ranked = request.beam = beam
        request.sampling = dataclasses.replace(
            sp, temperature=0.0, logprobs=max(sp.logprobs or 0, beam.candidates_per_beam)
        )
    elif sp.is_ranked:
        request.ranked = BestOf(sp.logprobs)
        request.sampling = dataclasses.replace(sp, logprobs=sp.logprobs or 0)
