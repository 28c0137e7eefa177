"""best_of and beam-search fields: one conversion each way (gateway -> proto -> worker), the
gateway's parsing (vLLM's names, temperature unset means 0 with beam search) and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.clients import _sampling_to_proto
from gateway.downstream import Guided
from gateway.errors import APIError
from gateway.validation import parse_chat, parse_completion
from services.common.sampling import SamplingError, SamplingParams, validate_sampling
from services.worker.rpc import sampling_from_pb
from tandem.v1 import common_pb2


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_fields_survive_the_wire(early_stopping: bool | str) -> None:
    sp: SamplingParams[Guided] = SamplingParams(
        temperature=0.0,
        n=2,
        best_of=5,
        use_beam_search=True,
        length_penalty=0.5,
        early_stopping=early_stopping,
    )
    assert sampling_from_pb(_sampling_to_proto(sp)) == sp
    assert sampling_from_pb(_sampling_to_proto(SamplingParams(n=2, best_of=3))).best_of == 3


def test_an_unknown_early_stopping_value_is_refused_by_name() -> None:
    msg = common_pb2.SamplingParams(temperature=0.0, use_beam_search=True)
    msg.early_stopping = 7  # type: ignore[assignment]  # (a newer client's value)
    with pytest.raises(SamplingError) as err:
        validate_sampling(sampling_from_pb(msg))
    assert err.value.field == "early_stopping"


def test_gateway_reads_vllm_beam_fields() -> None:
    req = parse_completion(
        {
            "prompt": "hi",
            "n": 2,
            "best_of": 4,
            "use_beam_search": True,
            "length_penalty": 0.0,
            "early_stopping": "never",
        }
    )
    sp = req.params.sampling
    assert (sp.n, sp.best_of, sp.use_beam_search, sp.length_penalty, sp.early_stopping) == (
        2,
        4,
        True,
        0.0,
        "never",
    )
    assert sp.temperature == 0.0 and sp.num_sequences == 4 and sp.is_ranked
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}], "best_of": 3})
    assert chat.params.sampling.best_of == 3 and chat.params.sampling.is_ranked
    streamed = parse_completion(
        {"prompt": "hi", "n": 2, "best_of": 2, "stream": True}
    )  # best_of == n streams
    assert not streamed.params.sampling.is_ranked


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"use_beam_search": True, "stream": True}, "stream"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"best_of": 21}, "best_of"),
        ({"best_of": 2, "n": 3}, "best_of"),
        ({"use_beam_search": True, "temperature": 1.0}, "temperature"),
        ({"use_beam_search": True, "min_p": 0.1}, "min_p"),
        ({"use_beam_search": True, "repetition_penalty": 1.1}, "repetition_penalty"),
        ({"use_beam_search": True, "guided_choice": ["a", "b"]}, "guided_choice"),
        ({"use_beam_search": True, "early_stopping": 1}, "early_stopping"),
        ({"use_beam_search": "yes"}, "use_beam_search"),
        ({"length_penalty": 2.0}, "length_penalty"),
        ({"early_stopping": "never"}, "early_stopping"),
    ],
)
def test_gateway_refuses_by_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_completion({"prompt": "hi", **body})
    assert err.value.status == 400 and err.value.param == param
