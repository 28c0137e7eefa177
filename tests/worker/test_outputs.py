"""merge_outputs: the outputs that queue up while the rpc is sending go out as one message.
single_token: the outputs GenerateMany may send as a packed token."""

from __future__ import annotations

import dataclasses
from typing import Any

from services.worker.outputs import ChoiceOutput, RequestOutput, Usage, merge_outputs, single_token
from services.worker.request import TokenLogprob


def _lp(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id, -0.5, 1, ((token_id, -0.5),))


def test_merge_concatenates_each_choice_in_order_and_keeps_the_end() -> None:
    first = RequestOutput("r", (ChoiceOutput(0, (1,), (_lp(1),)), ChoiceOutput(1, (7,), (_lp(7),))))
    second = RequestOutput("r", (ChoiceOutput(0, (2, 3), (_lp(2), _lp(3))),))
    usage = Usage(prompt_tokens=4, completion_tokens=5, cached_prompt_tokens=0)
    last = RequestOutput(
        "r",
        (ChoiceOutput(1, (8,), (_lp(8),), "stop", 8), ChoiceOutput(0, (4,), (_lp(4),), "length")),
        finished=True,
        usage=usage,
    )
    merged = merge_outputs([first, second, last])
    by_index = {c.index: c for c in merged.choices}
    assert by_index[0].token_ids == (1, 2, 3, 4)
    assert [lp.token_id for lp in by_index[0].logprobs or ()] == [1, 2, 3, 4]
    assert by_index[0].finish_reason == "length"
    assert by_index[1].token_ids == (7, 8) and by_index[1].finish_reason == "stop"
    assert by_index[1].stop_token_id == 8
    assert merged.finished and merged.usage == usage


def test_merge_of_one_output_is_that_output() -> None:
    out = RequestOutput("r", (ChoiceOutput(0, (1,), None),), prompt_logprobs=(_lp(5),))
    assert merge_outputs([out]) is out
    later = RequestOutput("r", (ChoiceOutput(0, (2,), None),))
    merged = merge_outputs([out, later])
    assert merged.prompt_logprobs == (_lp(5),) and merged.choices[0].logprobs is None
    assert merged.choices[0].token_ids == (1, 2)


def test_single_token_is_one_token_of_the_given_choice_and_nothing_else() -> None:
    out = RequestOutput("r", (ChoiceOutput(3, (42,), None),))
    assert single_token(out, 3) == 42
    assert single_token(out, 0) is None  # another choice
    assert single_token(RequestOutput("r", (ChoiceOutput(3, (42, 43), None),)), 3) is None
    assert single_token(RequestOutput("r", ()), 3) is None
    two = RequestOutput("r", (ChoiceOutput(3, (42,), None), ChoiceOutput(4, (7,), None)))
    assert single_token(two, 3) is None


def test_single_token_is_none_when_any_other_field_is_set() -> None:
    """Every field of RequestOutput and ChoiceOutput but the token and the request id: a packed
    token carries none of them. A field added to either dataclass fails here (KeyError) until it
    is given a set value below and single_token checks it."""
    choice = ChoiceOutput(0, (42,), None)
    out = RequestOutput("r", (choice,))
    choice_values: dict[str, Any] = {
        "logprobs": (_lp(42),),
        "finish_reason": "stop",
        "stop_token_id": 42,
        "cumulative_logprob": -1.5,
    }
    output_values: dict[str, Any] = {
        "finished": True,
        "usage": Usage(4, 1, 0),
        "error": "failed",
        "prompt_logprobs": (_lp(5),),
        "kv_handle": object(),
        "embedding": (0.5,),
    }
    for f in dataclasses.fields(ChoiceOutput):
        if f.name not in ("index", "token_ids"):
            changed = dataclasses.replace(choice, **{f.name: choice_values[f.name]})
            assert single_token(dataclasses.replace(out, choices=(changed,)), 0) is None, f.name
    for f in dataclasses.fields(RequestOutput):
        if f.name not in ("request_id", "choices"):
            assert single_token(dataclasses.replace(out, **{f.name: output_values[f.name]}), 0) is None, (
                f.name
            )
    assert single_token(out, 0) == 42
