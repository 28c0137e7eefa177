"""gpt-oss's harmony format: reasoning (analysis channel), content (final channel, preambles) and
tool calls (commentary channel to=functions.*), streamed in any chunking and whole alike; the
parsers are picked by "auto" from the real gpt-oss chat template; the stream keeps the harmony
markers (special tokens) while decoding."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from services.styler.parsers.auto import detect_reasoning_parser, detect_tool_parser
from services.styler.parsers.base import ParsedText
from services.styler.parsers.harmony import HarmonyParser

from .harmony_data import GPT_OSS_TEMPLATE, harmony_model_dir

ARGS = {"city": "Zürich", "query": "天気 🌦", "n": 3}
A = json.dumps(ARGS, ensure_ascii=False)
THINK = "<|channel|>analysis<|message|>The user wants the weather. I should call get_weather.<|end|>"
CALL = f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{A}<|call|>"
CALL_RECIPIENT_FIRST = (
    '<|start|>assistant to=functions.now<|channel|>commentary json<|message|>{"tz": "UTC"}<|call|>'
)
FINAL = "<|start|>assistant<|channel|>final<|message|>It is 21 °C in Zürich.<|return|>"
REASONING = "The user wants the weather. I should call get_weather."

# output -> (reasoning, content, calls) with reasoning and tool parsing on
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any]]]]] = [
    (THINK + FINAL, REASONING, "It is 21 °C in Zürich.", []),
    (THINK + CALL, REASONING, "", [("get_weather", ARGS)]),
    (THINK + CALL + CALL_RECIPIENT_FIRST, REASONING, "", [("get_weather", ARGS), ("now", {"tz": "UTC"})]),
    # a preamble (commentary without a recipient) is shown to the user
    (
        "<|channel|>commentary<|message|>Checking.<|end|>" + CALL,
        "",
        "Checking.",
        [("get_weather", ARGS)],
    ),
    # cut off mid-answer (max_tokens), and the end token left out (the worker drops EOS)
    (THINK + "<|start|>assistant<|channel|>final<|message|>It is", REASONING, "It is", []),
    ("<|channel|>final<|message|>Hi", "", "Hi", []),
    # malformed arguments are content; plain text (no harmony header) is content
    (
        '<|channel|>commentary to=functions.x <|constrain|>json<|message|>{"a": 1<|call|>',
        "",
        '{"a": 1',
        [],
    ),
    (
        "Just text, no harmony headers anywhere in this rather long answer of many words.",
        "",
        "Just text, no harmony headers anywhere in this rather long answer of many words.",
        [],
    ),
]


def _run(parser: HarmonyParser, text: str, chunks: list[int]) -> ParsedText:
    out, pos = ParsedText(), 0
    for size in chunks:
        out.extend(parser.feed(text[pos : pos + size]))
        pos += size
    out.extend(parser.feed(text[pos:]))
    out.extend(parser.finish())
    return out


@pytest.mark.parametrize(("text", "reasoning", "content", "calls"), CASES)
def test_harmony_in_any_chunking(
    text: str, reasoning: str, content: str, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    rng = random.Random(len(text))
    chunkings = [[len(text)], [1] * len(text)] + [
        [rng.randint(1, 9) for _ in range(len(text) // 3)] for _ in range(5)
    ]
    for chunks in chunkings:
        out = _run(HarmonyParser("harmony", reasoning=True, tools=True), text, chunks)
        assert (out.reasoning, out.content) == (reasoning, content), chunks
        assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls
        assert all(c.id.startswith("call_") for c in out.tool_calls)


def test_reasoning_off_is_content_and_tools_off_is_content() -> None:
    out = _run(HarmonyParser("harmony", reasoning=False, tools=True), THINK + FINAL, [5] * 40)
    assert out.reasoning == "" and out.content == REASONING + "It is 21 °C in Zürich."
    out = _run(HarmonyParser("harmony", reasoning=True, tools=False), THINK + CALL, [7] * 40)
    assert out.reasoning == REASONING and out.content == A and out.tool_calls == []


def test_reasoning_streams_before_the_message_ends() -> None:
    parser = HarmonyParser("harmony", reasoning=True, tools=True)
    out = parser.feed("<|channel|>analysis<|message|>Let me think<|e")
    assert out.reasoning == "Let me think"  # the marker's prefix is held back, not the text


def test_auto_picks_harmony_from_the_real_template() -> None:
    template = GPT_OSS_TEMPLATE.read_text(encoding="utf-8")
    assert detect_tool_parser(lambda t: False, template) == "harmony"
    assert detect_reasoning_parser(lambda t: False, template) == "harmony"


def test_stream_keeps_harmony_markers(tmp_path: Path) -> None:
    """Through a styler's DetokenizeStream: the markers are special tokens (skipped by default),
    kept for the harmony parsers, and the deltas carry reasoning, content and the call."""
    from services.styler.stream import StreamOptions
    from services.styler.styler import Styler, StylerOptions

    model_dir = harmony_model_dir(tmp_path)
    styler = Styler.load(StylerOptions(model=str(model_dir)))
    assert styler.tool_parser == "harmony" and styler.reasoning_parser == "harmony"
    ids = styler.tokenize(THINK + CALL, add_special_tokens=False)
    assert "<|" not in styler.detokenize(ids)  # the markers are special tokens, skipped by default
    session = styler.open_stream(StreamOptions(tool_parser="auto", reasoning_parser="auto"))
    reasoning, content, calls = "", "", []
    for i, token in enumerate(ids):
        delta = session.add(0, [token], finished=i == len(ids) - 1)
        reasoning += delta.reasoning_text
        content += delta.text
        calls += delta.tool_calls
    assert reasoning == REASONING and content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)]
