"""What a request whose choices are ranked (best_of, beam search: fan_out.py) tells the engine:
nothing until every sequence is done, then the n best, ranked, with the usage."""

from __future__ import annotations

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
