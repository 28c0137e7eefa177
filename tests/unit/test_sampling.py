"""services/common/sampling.py: one dataclass, one validation naming the field, the same defaults
and ranges on both sides of the wire (gateway -> proto -> worker)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gateway.clients import _sampling_to_proto
from gateway.downstream import Guided
from gateway.errors import APIError
from gateway.validation import parse_chat, parse_completion
from services.common.sampling import SamplingError, SamplingParams, validate_sampling
from services.worker.request import EngineRequest, InvalidRequestError, validate_request
from services.worker.rpc import sampling_from_pb
from tandem.v1 import common_pb2

BAD = [
    ({"temperature": -0.1}, "temperature", ">= 0.0"),
    ({"temperature": 2.5}, "temperature", "<= 2.0"),
    ({"temperature": math.nan}, "temperature", "finite"),
    ({"top_p": 0.0}, "top_p", "> 0"),
    ({"top_p": 1e-46}, "top_p", "float32"),
    ({"top_p": 1.5}, "top_p", "<= 1.0"),
    ({"top_k": -2}, "top_k", ">= -1"),
    ({"top_k": 2**31}, "top_k", "<="),
    ({"min_p": -0.5}, "min_p", ">= 0.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": 1e300}, "repetition_penalty", "largest float32"),
    ({"repetition_penalty": math.inf}, "repetition_penalty", "finite"),
    ({"presence_penalty": 2.5}, "presence_penalty", "<= 2.0"),
    ({"frequency_penalty": -3.0}, "frequency_penalty", ">= -2.0"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"seed": 2**64}, "seed", "<="),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": 2**32}, "max_tokens", "<="),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens (4)"),
    ({"n": 0}, "n", ">= 1"),
    ({"logprobs": 21}, "logprobs", "<= 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", ">= 0"),
    ({"stop_token_ids": (3, 2**32)}, "stop_token_ids", "below"),
    ({"logit_bias": ((3, 100.5),)}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": ((3, math.nan),)}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": ((2**32, 1.0),)}, "logit_bias", "below"),
    ({"logit_bias": ((3, 1.0), (3, 2.0))}, "logit_bias", "once"),
    ({"logit_bias": tuple((t, 1.0) for t in range(301))}, "logit_bias", "at most 300"),
]


@pytest.mark.parametrize(("change", "field", "words"), BAD)
def test_validation_names_the_field(change: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SamplingError) as err:
        validate_sampling(SamplingParams(**change))
    assert err.value.field == field and words in err.value.message, err.value
    assert str(err.value).startswith(f"{field}: must")


def test_defaults_and_edges_are_valid() -> None:
    validate_sampling(SamplingParams())
    validate_sampling(
        SamplingParams(
            temperature=0.0,
            top_p=1.0,
            top_k=-1,
            min_p=1.0,
            presence_penalty=-2.0,
            frequency_penalty=2.0,
            seed=2**64 - 1,
            max_tokens=1,
            min_tokens=1,
            logprobs=20,
            stop_token_ids=(0, 2**32 - 1),
        )
    )
    with pytest.raises(SamplingError):
        validate_sampling(SamplingParams(stop_token_ids=(600,)), vocab_size=512)
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams().is_greedy


def test_the_worker_names_the_field_under_sampling() -> None:
    req = EngineRequest("r", (1, 2, 3), SamplingParams(top_p=0.0))
    with pytest.raises(InvalidRequestError) as err:
        validate_request(req, vocab_size=512, max_model_len=64)
    assert err.value.field == "sampling.top_p" and str(err.value).startswith(
        "sampling.top_p: must be >= 2**-149 (> 0"
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
        ({"min_p": 1.5}, "min_p", "<= 1.0"),
        ({"top_k": -3}, "top_k", ">= -1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ],
)
def test_the_gateway_names_the_request_field(body: dict[str, Any], param: str, words: str) -> None:
    """validate_sampling's complaint, as a 400 naming the field the request used."""
    from gateway.limits import Limits

    with pytest.raises(APIError) as err:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, Limits(max_logprobs=0))
    assert err.value.status == 400 and err.value.param == param and words in str(err.value), err.value
    with pytest.raises(APIError) as err:
        parse_completion({"prompt": "hi", "logprobs": 21}, Limits(max_logprobs=0))
    assert err.value.param == "logprobs"


def test_one_conversion_each_way_keeps_every_field() -> None:
    """gateway -> proto -> worker is the identity (values exact in float32), unset means default."""
    assert sampling_from_pb(common_pb2.SamplingParams()) == SamplingParams()
    assert sampling_from_pb(_sampling_to_proto(SamplingParams())) == SamplingParams()
    full: SamplingParams[Guided] = SamplingParams(
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        min_p=0.125,
        repetition_penalty=1.25,
        presence_penalty=-0.5,
        frequency_penalty=1.5,
        seed=2**64 - 1,
        max_tokens=77,
        min_tokens=3,
        stop_token_ids=(5, 9),
        ignore_eos=True,
        n=3,
        logprobs=2,
        prompt_logprobs=0,
        logit_bias=((3, -100.0), (7, 0.5), (2**32 - 1, 100.0)),
    )
    assert sampling_from_pb(_sampling_to_proto(full)) == full
    # the worker does not check (the engine does, once): an out-of-range value passes through
    assert sampling_from_pb(common_pb2.SamplingParams(top_p=0.0)).top_p == 0.0


def test_openai_seed_is_an_int64_or_uint64() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**chat, "seed": -1}).params.sampling.seed == 2**64 - 1
    assert parse_chat({**chat, "seed": 7}).params.sampling.seed == 7
    with pytest.raises(APIError):
        parse_chat({**chat, "seed": 2**64})


def test_logit_bias_is_read_from_openai_json_and_checked_against_the_vocabulary() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    got = parse_chat({**chat, "logit_bias": {"50": 10, "7": -100, "0": 0.25}}).params.sampling.logit_bias
    assert got == ((0, 0.25), (7, -100.0), (50, 10.0))  # sorted by id, floats
    assert parse_completion({"prompt": "hi", "logit_bias": {"5": 100}}).params.sampling.logit_bias == (
        (5, 100.0),
    )
    assert parse_chat({**chat, "logit_bias": {}}).params.sampling.logit_bias == ()
    for bad, words in (
        ({"x": 1}, "token ids"),
        ({"-1": 1}, "token ids"),
        ({"1.5": 1}, "token ids"),
        ({"5": "1"}, "numbers"),
        ({"5": True}, "numbers"),
        ({"5": 101}, "[-100, 100]"),
        ({"5": -100.5}, "[-100, 100]"),
        ({"5": 1, "05": 2}, "twice"),
        ({str(t): 1 for t in range(301)}, "at most 300"),
        ([5, 1], "object"),
    ):
        with pytest.raises(APIError) as err:
            parse_chat({**chat, "logit_bias": bad})
        assert err.value.status == 400 and err.value.param == "logit_bias" and words in str(err.value), bad
    with pytest.raises(SamplingError) as serr:
        validate_sampling(SamplingParams(logit_bias=((600, 1.0),)), vocab_size=512)
    assert serr.value.field == "logit_bias" and "below the vocabulary size 512" in serr.value.message
    req = EngineRequest("r", (1, 2, 3), SamplingParams(logit_bias=((512, 1.0),)))
    with pytest.raises(InvalidRequestError) as werr:
        validate_request(req, vocab_size=512, max_model_len=64)
    assert werr.value.field == "sampling.logit_bias"


def test_prompt_logprobs_is_read_and_refused_with_stream() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**chat, "prompt_logprobs": 20}).params.sampling.prompt_logprobs == 20
    assert parse_completion({"prompt": "hi", "prompt_logprobs": 0}).params.sampling.prompt_logprobs == 0
    for body, words in (
        ({"prompt_logprobs": 21}, "<= 20"),
        ({"prompt_logprobs": -1}, ">= 0"),
        ({"prompt_logprobs": 2, "stream": True}, "stream"),
    ):
        with pytest.raises(APIError) as err:
            parse_chat({**chat, **body})
        assert err.value.param == "prompt_logprobs" and words in str(err.value), body
