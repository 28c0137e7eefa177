"""What the engine hands back after each step: per-request deltas, finish reasons and usage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.worker.request import TokenLogprob

if TYPE_CHECKING:
    from services.worker.kv_handles import HeldKV


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all choices, produced by this worker
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class ChoiceOutput:
    index: int  # choice index (first_choice_index + i)
    token_ids: tuple[int, ...]  # new since the previous output
    logprobs: tuple[TokenLogprob, ...] | None  # parallel to token_ids when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" when this choice ended now
    stop_token_id: int | None = None  # the EOS / stop id that ended it
    # best_of / beam search (fan_out.py): the choice's summed token logprobs, sent with its end
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    choices: tuple[ChoiceOutput, ...]  # only choices with news
    finished: bool = False
    usage: Usage | None = None  # on the last output of a request only
    error: str | None = None  # set when the engine failed this request (internal error)
    # with the first token only: logprobs of prompt tokens 1.. (the first prompt token has none)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # a Prefill (hold_kv) request that did not end with its first token: where its KV is kept
    kv_handle: HeldKV | None = None
    # a pooling request's result (its last output): the normalised embedding, hidden_size floats
    embedding: tuple[float, ...] | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One output saying what `outputs` (consecutive, of one request, none failed) said in turn.

    The rpc merges the outputs that queued up while it was busy sending, so a worker whose event
    loop falls behind the engine sends fewer, larger messages instead of falling further behind.
    Per choice index: token ids (and logprobs) concatenated in order, the last finish reason.
    """
    if len(outputs) == 1:
        return outputs[0]
    choices: dict[int, ChoiceOutput] = {}
    for out in outputs:
        for c in out.choices:
            prev = choices.get(c.index)
            if prev is None:
                choices[c.index] = c
                continue
            logprobs = None
            if prev.logprobs is not None or c.logprobs is not None:
                logprobs = (prev.logprobs or ()) + (c.logprobs or ())
            # the later output's own fields (finish reason, stop id, cumulative logprob) win
            choices[c.index] = dataclasses.replace(
                c, token_ids=prev.token_ids + c.token_ids, logprobs=logprobs
            )
    last = outputs[-1]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(
        last.request_id,
        tuple(choices.values()),
        last.finished,
        last.usage,
        None,
        prompt_logprobs,
        last.kv_handle,
        last.embedding,
    )


def single_token(out: RequestOutput, index: int) -> int | None:
    """The one new token of choice `index` when that is all `out` says, else None: a mid-stream
    output of that choice alone, one token, and nothing else set (logprobs, finish reason, stop
    id, cumulative logprob, prompt logprobs, usage, error, KV handle, embedding). GenerateMany
    sends such an output packed (GenerateManyResponse.token_ids): the reader rebuilds the chunk
    from the token alone, so every other field must be unset."""
    if (
        len(out.choices) != 1
        or out.finished
        or out.usage is not None
        or out.error is not None
        or out.prompt_logprobs is not None
        or out.kv_handle is not None
        or out.embedding is not None
    ):
        return None
    choice = out.choices[0]
    if (
        choice.index != index
        or len(choice.token_ids) != 1
        or choice.logprobs is not None
        or choice.finish_reason is not None
        or choice.stop_token_id is not None
        or choice.cumulative_logprob is not None
    ):
        return None
    return choice.token_ids[0]
