"""Sampling parameters: the one dataclass, its defaults, its ranges and what "greedy" means.

Both sides of the wire use it. The gateway (HTTP and the public gRPC API, through
`gateway/validation.py`) builds one from an OpenAI request and `gateway/clients.py` turns it into
`common.proto`'s `SamplingParams`; the worker's `rpc.py` turns that back into this dataclass and
the engine checks it with `validate_sampling` before admitting the request. So a value one side
accepts the other accepts, an unset proto field means the default below, and a bad value is
named by its field on both sides (a 400 with `param`, or INVALID_ARGUMENT "sampling.<field>: ...").

`guided` is each side's own view of a structured-output constraint (the gateway's `Guided`
remembers the HTTP field it came from; the worker's `GuidedSpec` is its grammar cache key).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

G = TypeVar("G")

MAX_TOP_LOGPROBS = 20
# OpenAI's bounds on `logit_bias`: at most 300 entries, each bias in [-100, 100] (added to the logit).
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
# Counts and token ids travel as uint32 on the wire, top_k as int32 and the seed as uint64: larger
# values are refused here rather than failing to encode later.
MAX_UINT32 = 2**32 - 1
MAX_INT32 = 2**31 - 1
MAX_UINT64 = 2**64 - 1
# Sampling floats travel as float32: a positive value below the smallest float32 would arrive as 0
# (which top_p and repetition_penalty refuse), a larger one than the largest as inf.
MIN_POSITIVE_FLOAT32 = 2.0**-149
MAX_FLOAT32 = 3.4028234663852886e38


class SamplingError(ValueError):
    """A sampling parameter is out of range; `field` names it (as in this dataclass)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message  # starts with "must ...": callers prefix the field as they name it


@dataclass(frozen=True)
class SamplingParams(Generic[G]):
    """What a request asks of the sampler and the stopping rules; the defaults are the API's."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # uint64; None: the worker draws one when it admits the request
    max_tokens: int | None = None  # per choice; None: up to the context length
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus k top alternatives
    prompt_logprobs: int | None = None
    guided: G | None = None  # structured output; None: free
    # (token id, bias) pairs sorted by id, each id once: added to the logits before penalties and
    # temperature (OpenAI `logit_bias`); logprobs stay those of the raw distribution, as vLLM's
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def is_greedy(self) -> bool:
        """The one definition: greedy rows take the argmax and draw no random numbers."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def has_filter(self) -> bool:
        """Some of top-k, top-p, min-p cuts the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def _bound(value: float) -> str:
    if value == MIN_POSITIVE_FLOAT32:
        return "2**-149 (> 0, as a float32)"
    if value == MAX_FLOAT32:
        return "3.4e38 (the largest float32)"
    return str(value)


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: [lo, hi] (hi None: no upper bound)."""

    lo: float
    hi: float | None = None

    def check(self, name: str, value: float) -> None:
        if value < self.lo:
            raise SamplingError(name, f"must be >= {_bound(self.lo)}, got {value}")
        if self.hi is not None and value > self.hi:
            raise SamplingError(name, f"must be <= {_bound(self.hi)}, got {value}")


# Temperature and penalties follow OpenAI; the rest is what the sampler and the wire can carry.
RANGES: dict[str, Range] = {
    "temperature": Range(0.0, 2.0),
    "top_p": Range(MIN_POSITIVE_FLOAT32, 1.0),  # > 0
    "top_k": Range(-1, MAX_INT32),
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(MIN_POSITIVE_FLOAT32, MAX_FLOAT32),  # > 0
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "seed": Range(0, MAX_UINT64),
    "max_tokens": Range(1, MAX_UINT32),
    "min_tokens": Range(0, MAX_UINT32),
    "n": Range(1, MAX_UINT32),
    "logprobs": Range(0, MAX_TOP_LOGPROBS),
    "prompt_logprobs": Range(0, MAX_TOP_LOGPROBS),
}
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def check_token_ids(name: str, ids: tuple[int, ...] | list[int], vocab_size: int = 0) -> None:
    """Every id in [0, vocab_size) (vocab_size 0: unknown here, [0, 2**32) then)."""
    limit = vocab_size or MAX_UINT32 + 1
    bad = next((t for t in ids if not 0 <= t < limit), None)
    if bad is not None:
        raise SamplingError(name, f"must be token ids below the vocabulary size {limit}, got {bad}")


def validate_sampling(sp: SamplingParams[Any], vocab_size: int = 0) -> None:
    """The one check of a request's sampling parameters; raises SamplingError naming the field.
    (The context length, which needs the prompt, is the engine's and the gateway's to check.)"""
    for name in FLOAT_FIELDS:
        value = getattr(sp, name)
        if not math.isfinite(value):  # NaN passes every comparison below
            raise SamplingError(name, f"must be a finite number, got {value}")
    for name, bounds in RANGES.items():
        value = getattr(sp, name)
        if value is not None:
            bounds.check(name, value)
    if sp.max_tokens is not None and sp.min_tokens > sp.max_tokens:
        raise SamplingError("min_tokens", f"must be <= max_tokens ({sp.max_tokens}), got {sp.min_tokens}")
    check_token_ids("stop_token_ids", sp.stop_token_ids, vocab_size)
    check_logit_bias(sp.logit_bias, vocab_size)


def check_logit_bias(bias: tuple[tuple[int, float], ...], vocab_size: int = 0) -> None:
    """At most 300 entries, ids in the vocabulary, each once, biases finite in [-100, 100]."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingError(
            "logit_bias", f"must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}"
        )
    ids = [t for t, _ in bias]
    if len(set(ids)) != len(ids):
        raise SamplingError("logit_bias", "must name each token id once")
    check_token_ids("logit_bias", ids, vocab_size)
    bad = next((b for _, b in bias if not (math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS)), None)
    if bad is not None:
        raise SamplingError("logit_bias", f"must map to biases in [-100, 100], got {bad}")


def resumed(sampling: SamplingParams[G], num_generated: int) -> SamplingParams[G]:
    """The parameters of a choice continued after `num_generated` tokens it already produced
    (prompt + those tokens sent as the new prompt): its token budgets shrink by them."""
    return dataclasses.replace(
        sampling,
        max_tokens=None if sampling.max_tokens is None else max(sampling.max_tokens - num_generated, 0),
        min_tokens=max(sampling.min_tokens - num_generated, 0),
    )
