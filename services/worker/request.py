"""What a request is inside the engine: its parameters, validation, and the per-choice state.

The sampling parameters are `services/common/sampling.py`'s (re-exported here for engine callers).

An `EngineRequest` (immutable, what a client asked) becomes a `Request` (mutable, engine-owned)
with one `Sequence` per choice. Choice 0 computes the prompt; with n > 1 the other choices wait
parked until the prompt is done and then fork from it, sharing the prompt's full KV blocks.
A sequence's `token_ids` are prompt + output; `num_computed_tokens` of them have KV in the cache.
A sequence samples when a step computes its last token.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from services.common.block_hash import ROOT_HASH
from services.common.sampling import SamplingError, SamplingParams, validate_sampling
from services.worker.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

    from services.worker.guided import CompiledGrammar, GuidedSpec, GuidedState
    from services.worker.lora.adapter import LoRAAdapter
    from services.worker.mm_inputs import ImageInput

__all__ = [
    "EngineRequest",
    "InvalidRequestError",
    "Request",
    "SamplingParams",
    "Sequence",
    "validate_request",
]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams[GuidedSpec] = field(default_factory=SamplingParams)
    generated_token_ids: tuple[int, ...] = ()  # output produced elsewhere (resume / prefill worker)
    first_choice_index: int = 0
    # Disaggregated prefill: after the first token, keep the prompt's KV blocks under a handle for
    # a decode worker (kv_transfer.py) instead of decoding on.
    hold_kv: bool = False
    # Layer-wise push (kv_layerwise.py): with hold_kv, the handle is opened under this id when the
    # request is admitted, and its KV is readable layer by layer while the prompt is computed.
    kv_handle_id: str = ""
    # Pooling (an embed worker, --task embed): compute the prompt only; the step that computes its
    # last token yields that token's final-norm hidden state, L2-normalised, instead of sampling,
    # and the request ends there, its blocks freed at once. `sampling` is unused.
    pooling: bool = False
    # Fairness group of the scheduler (the prompts of one gateway request share one); "" = its own.
    group_id: str = ""
    # sampling.guided compiled for this worker's tokenizer (the gRPC servicer compiles it off the
    # engine thread; Engine.add_request compiles it when missing)
    grammar: CompiledGrammar | None = field(default=None, compare=False, repr=False)
    # Images whose embeddings replace placeholder tokens of the prompt (mm_inputs.py)
    images: tuple[ImageInput, ...] = field(default=(), compare=False, repr=False)
    # The LoRA adapter to apply, by name ("" = the base model); Engine.add_request resolves it.
    lora_name: str = ""
    lora: LoRAAdapter | None = field(default=None, compare=False, repr=False)


def validate_request(req: EngineRequest, vocab_size: int, max_model_len: int) -> int:
    """Check `req` against the model; return the effective max_tokens. Raises InvalidRequestError."""
    sp = req.sampling
    if not req.request_id:
        raise InvalidRequestError("request_id", "must be non-empty")
    if not req.prompt_token_ids:
        raise InvalidRequestError("prompt_token_ids", "the prompt is empty")
    if req.pooling:
        return _validate_pooling(req, vocab_size, max_model_len)
    end = 0
    for i, image in enumerate(req.images):
        if image.offset < end or image.length <= 0 or image.end > len(req.prompt_token_ids):
            raise InvalidRequestError(
                f"images[{i}]", "image positions must be in order, not overlap, and lie in the prompt"
            )
        end = image.end
    # Choice indices travel as uint32: the last one, first_choice_index + n - 1, must fit too.
    if req.first_choice_index + max(sp.n, 1) - 1 > 2**32 - 1:
        raise InvalidRequestError(
            "first_choice_index", f"first_choice_index + n must be at most 2**32 (n is {sp.n})"
        )
    for name, ids in (
        ("prompt_token_ids", req.prompt_token_ids),
        ("generated_token_ids", req.generated_token_ids),
    ):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(name, f"token id {bad} is not below the vocabulary size {vocab_size}")
    try:
        validate_sampling(sp, vocab_size)
    except SamplingError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None
    if sp.num_sequences > 1 and req.generated_token_ids:
        raise InvalidRequestError("generated_token_ids", "requires n = 1 (and no best_of)")
    if sp.num_sequences > 1 and req.hold_kv:
        raise InvalidRequestError("sampling.n", "Prefill takes one choice (n = 1, no best_of)")
    if sp.use_beam_search and req.generated_token_ids:
        raise InvalidRequestError("generated_token_ids", "beam search cannot resume a choice")
    if sp.use_beam_search and req.hold_kv:
        raise InvalidRequestError(
            "sampling.use_beam_search", "Prefill samples one token: beam search runs on the decode worker"
        )
    prompt_len = len(req.prompt_token_ids)
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            "prompt_token_ids",
            f"prompt of {prompt_len} tokens leaves no room in the context of {max_model_len}",
        )
    max_tokens = max_model_len - prompt_len if sp.max_tokens is None else sp.max_tokens
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            "sampling.max_tokens",
            f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the context length {max_model_len}",
        )
    if len(req.generated_token_ids) >= max_tokens:
        raise InvalidRequestError(
            "generated_token_ids",
            f"{len(req.generated_token_ids)} tokens already reach max_tokens {max_tokens}",
        )
    if sp.min_tokens > max_tokens:
        raise InvalidRequestError(
            "sampling.min_tokens", f"must be <= max_tokens ({max_tokens}), got {sp.min_tokens}"
        )
    return max_tokens


def _validate_pooling(req: EngineRequest, vocab_size: int, max_model_len: int) -> int:
    """A pooling request: only its prompt matters, which may fill the whole context (nothing is
    generated after it). Returns max_tokens 0."""
    if req.images or req.generated_token_ids or req.hold_kv:
        raise InvalidRequestError("prompt_token_ids", "a pooling request is token ids only")
    bad = next((t for t in req.prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            "prompt_token_ids", f"token id {bad} is not below the vocabulary size {vocab_size}"
        )
    if len(req.prompt_token_ids) > max_model_len:
        raise InvalidRequestError(
            "prompt_token_ids",
            f"the input has {len(req.prompt_token_ids)} tokens; the context length is {max_model_len}",
        )
    return 0


class SequenceStatus(enum.Enum):
    PARKED = "parked"  # a choice of n > 1 waiting for the prompt to be computed by choice 0
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FETCHING = "fetching"  # disaggregated decode: its blocks are being filled from a prefill worker


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


_seq_ids = itertools.count()


class Sequence:
    """One choice of a request: its tokens, computed prefix, blocks and fresh (unstreamed) output."""

    def __init__(self, request: Request, choice_index: int, token_ids: list[int]) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.choice_index = choice_index
        self.token_ids = token_ids
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the leading full, computed blocks
        # Leading entries of block_ids that are placeholders (their blocks fell out of every
        # layer's sliding window and were freed: block_manager.free_out_of_window)
        self.num_freed_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.finish_reported = False  # the finish reason went out in a RequestOutput
        self.new_token_ids: list[int] = []
        self.new_logprobs: list[TokenLogprob] = []
        self.num_preemptions = 0
        # host-tier slots holding its computed KV while it is preempted by swap (block_manager.py)
        self.swapped: list[int] | None = None
        # guided decoding: the matcher of this choice, advanced with every output token (so a
        # preempted sequence keeps it: recompute changes the KV, not the output)
        self.guided: GuidedState | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def key_tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] as the prefix cache keys them (image positions by image hash)."""
        keys = self.request.cache_key_ids
        if keys is None or start >= len(keys):
            return self.token_ids[start:end]
        return keys[start : min(end, len(keys))] + self.token_ids[len(keys) : end]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.prompt_len :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.choice_index}, {self.status.value}, "
            f"computed {self.num_computed_tokens}/{self.num_tokens}, blocks {self.block_ids})"
        )


class Request:
    """Engine-side state of one EngineRequest: its choices and counters."""

    def __init__(
        self, req: EngineRequest, max_tokens: int, eos_token_ids: tuple[int, ...], arrival: int
    ) -> None:
        self.req = req
        self.request_id = req.request_id
        self.sampling = req.sampling
        self.max_tokens = max_tokens
        self.prompt_len = len(req.prompt_token_ids)
        self.arrival = arrival
        stop = set(req.sampling.stop_token_ids)
        self.stop_token_ids = frozenset(stop if req.sampling.ignore_eos else stop | set(eos_token_ids))
        prompt = list(req.prompt_token_ids)
        self.cache_key_ids: list[int] | None = None
        # The prefix cache's chain root: blocks computed under an adapter are its own
        # (services/common/block_hash.py, lora/adapter.py lora_root_hash).
        self.root_hash = req.lora.root_hash if req.lora is not None else ROOT_HASH
        if req.images:
            from services.worker.mm_inputs import cache_key_ids

            self.cache_key_ids = cache_key_ids(prompt, req.images)
        first = Sequence(self, req.first_choice_index, prompt + list(req.generated_token_ids))
        self.sequences = [first]
        for i in range(1, req.sampling.num_sequences):
            child = Sequence(self, req.first_choice_index + i, list(prompt))
            child.status = SequenceStatus.PARKED
            self.sequences.append(child)
        self.error: str | None = None  # set when the engine failed this request (guided decoding)
        if req.grammar is not None:
            self._start_guided(req.grammar)
        self.num_cached_prompt_tokens: int | None = None  # set when choice 0 is first scheduled
        # prompt_logprobs: entry j-1 is the logprob of prompt token j (token 0 has none)
        self.prompt_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs_sent = False
        self.aborted = False
        # pooling: the normalised hidden state of the last prompt token, once computed
        # (a [hidden_size] float32 tensor on the device, set by the scheduler's update)
        self.embedding: torch.Tensor | None = None
        # best_of / beam search: what picks the n choices returned (fan_out.py); None: all of them
        # (typed Any: ranked.Ranked and beam_search.BeamSearch import this module)
        self.ranked: Any = None
        self.beam: Any = None  # beam search: the BeamSearch, the same object as `ranked`

    def _start_guided(self, grammar: CompiledGrammar) -> None:
        """A matcher per choice; choice 0's consumes the tokens generated elsewhere (resume, or
        the first token of a prefill worker), which must be a valid unfinished prefix."""
        first = grammar.new_state(self.stop_token_ids)
        for child in self.sequences[1:]:
            child.guided = first.fork()
        self.sequences[0].guided = first
        self._consume_given(grammar, self.req.generated_token_ids)

    def add_generated(self, token_ids: tuple[int, ...], final: bool = False) -> None:
        """Tokens generated elsewhere that arrive after the request was created: a layer-wise
        prefill's first token comes with its KV (kv_layerwise.py). Raises InvalidRequestError
        as the constructor does for generated_token_ids. `final`: they end the choice (nothing
        follows, so the grammar, which may be complete with them, is not advanced)."""
        assert len(self.sequences) == 1 and self.sequences[0].num_computed_tokens <= self.prompt_len
        first = self.sequences[0]
        if first.guided is not None and self.req.grammar is not None and not final:
            before = first.guided
            first.guided = before.fork()  # (refused: the request stays as it was)
            try:
                self._consume_given(self.req.grammar, token_ids)
            except InvalidRequestError:
                first.guided = before
                raise
        self.req = replace(self.req, generated_token_ids=self.req.generated_token_ids + token_ids)
        first.token_ids.extend(token_ids)

    def _consume_given(self, grammar: CompiledGrammar, token_ids: tuple[int, ...]) -> None:
        first = self.sequences[0].guided
        assert first is not None
        for token in token_ids:
            first.consume(token)
            if first.error is not None or first.complete:
                break
        grammar.compiler.refresh_masks([first])  # one mask, after the last of them
        if first.error is not None:
            raise InvalidRequestError(
                "generated_token_ids", f"not a valid output of sampling.guided: {first.error}"
            )
        if first.complete:
            raise InvalidRequestError(
                "generated_token_ids", "already a complete output of sampling.guided: nothing may follow"
            )

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and are not all computed yet (no prefix cache then)."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len - 1

    @property
    def lora_id(self) -> int:
        """Its adapter's load id (0: the base model); the scheduler caps distinct ids per step."""
        return self.req.lora.lora_id if self.req.lora is not None else 0

    @property
    def group(self) -> str:
        """The scheduler's fairness group: requests sharing one take turns with the others."""
        return self.req.group_id or self.req.request_id

    @property
    def parked(self) -> list[Sequence]:
        return [s for s in self.sequences if s.status is SequenceStatus.PARKED]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)

    @property
    def num_completion_tokens(self) -> int:
        """Tokens generated by this worker over all choices (generated_token_ids given in are not counted)."""
        return sum(s.num_output_tokens for s in self.sequences) - len(self.req.generated_token_ids)
