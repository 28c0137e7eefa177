"""merge_outputs: the outputs that queue up while the rpc is sending go out as one message."""

from __future__ import annotations

from services.worker.outputs import ChoiceOutput, RequestOutput, Usage, merge_outputs
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
