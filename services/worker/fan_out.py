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

from services.worker.beam_search import BeamSearch
from services.worker.ranked import Ranked, RankedChoice
from services.worker.request import Request, TokenLogprob


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
        beam = BeamSearch(request, vocab_size)
        request.ranked = request.beam = beam
        request.sampling = dataclasses.replace(
            sp, temperature=0.0, logprobs=max(sp.logprobs or 0, beam.candidates_per_beam)
        )
    elif sp.is_ranked:
        request.ranked = BestOf(sp.logprobs)
        request.sampling = dataclasses.replace(sp, logprobs=sp.logprobs or 0)
