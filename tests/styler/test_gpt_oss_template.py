"""gpt-oss's real chat template (harmony: system + developer messages, TypeScript-style tool
namespaces, analysis / commentary / final channels) renders byte-identically to transformers'
apply_chat_template through the styler, text and token ids, for every conversation of the shared
template suite plus harmony's own inputs (`thinking`, `reasoning_effort`, `builtin_tools`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.styler.messages import message_dict

from .harmony_data import GPT_OSS_TEMPLATE, harmony_model_dir
from .test_chat_template import CALL, CASES, CONVERSATIONS, TOOLS, _ours, _reference

HARMONY_CONVERSATIONS = {
    "thinking_last_turn": (
        [
            message_dict("user", "2+2?"),
            {"role": "assistant", "content": "4", "thinking": "Two and two make four."},
        ],
        None,
        {},
    ),
    "thinking_before_call": (
        [
            message_dict("system", "Use tools."),
            message_dict("user", "Weather in Zürich?"),
            {**message_dict("assistant", None, tool_calls=[CALL]), "thinking": "Call get_weather."},
            message_dict("tool", '{"temp": 21}', tool_call_id=CALL["id"]),
        ],
        TOOLS,
        {"reasoning_effort": "high", "model_identity": "You are a weather bot."},
    ),
    "builtin_tools": (
        [message_dict("user", "Search the web.")],
        None,
        {"builtin_tools": ["browser", "python"]},
    ),
}
HARMONY_CASES = [(name, agp, False) for name in HARMONY_CONVERSATIONS for agp in (True, False)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return harmony_model_dir(tmp_path_factory.mktemp("gpt-oss"))


@pytest.mark.parametrize("case", CASES + HARMONY_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_gpt_oss_template_matches_transformers(
    tok_dir: Path, case: tuple[str, bool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, conversation in HARMONY_CONVERSATIONS.items():
        monkeypatch.setitem(CONVERSATIONS, name, conversation)
    template = GPT_OSS_TEMPLATE.read_text(encoding="utf-8")
    for source in (template, None):  # given explicitly, and the tokenizer's own
        ref, ours = _reference(tok_dir, source, case), _ours(tok_dir, source, case)
        assert ours == ref
    if not isinstance(ref, str):
        assert ref[0].startswith("<|start|>system<|message|>")
