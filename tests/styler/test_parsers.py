"""Tool-call and reasoning parsers: streamed in any chunking and whole give the same result."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from services.styler.parsers.auto import detect_reasoning_parser, detect_tool_parser
from services.styler.parsers.base import ParsedText
from services.styler.parsers.reasoning import make_reasoning_parser
from services.styler.parsers.tool_formats import TOOL_PARSERS

from .helpers import load_styler, needs_shared, shared_dir, template_files

ARGS = {"city": "Zürich", "query": "天気 🌦", "n": 3, "nested": {"a": [1, 2]}}
A = json.dumps(ARGS, ensure_ascii=False)
B = json.dumps({"tz": "UTC"})
HERMES_1 = f'<tool_call>\n{{"name": "get_weather", "arguments": {A}}}\n</tool_call>'
HERMES_2 = f'<tool_call>\n{{"name": "now", "arguments": {B}}}\n</tool_call>'
DS = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"
DS_1, DS_2 = DS.format(name="get_weather", args=A), DS.format(name="now", args=B)

# parser -> [(output, expected content, expected [(name, arguments dict)])]
CASES: dict[str, list[tuple[str, str, list[tuple[str, dict[str, Any]]]]]] = {
    "hermes": [
        (HERMES_1, "", [("get_weather", ARGS)]),
        (f"{HERMES_1}\n{HERMES_2}", "", [("get_weather", ARGS), ("now", {"tz": "UTC"})]),
        (f"Let me look that up.\n\n{HERMES_1}", "Let me look that up.\n\n", [("get_weather", ARGS)]),
        ("No tools needed: 1 < 2 and <tool is fine.", "No tools needed: 1 < 2 and <tool is fine.", []),
        (
            '<tool_call>\n{"name": "x", "arguments": {"a": 1\n</tool_call>',
            '<tool_call>\n{"name": "x", "arguments": {"a": 1\n</tool_call>',
            [],
        ),
        (
            f'{HERMES_1}<tool_call>{{"oops"}}</tool_call>',
            '<tool_call>{"oops"}</tool_call>',
            [("get_weather", ARGS)],
        ),
        ('<tool_call>{"name": "now", "arguments": {}}', "", [("now", {})]),  # unclosed but complete
        ('<tool_call>{"name": "now", "argu', '<tool_call>{"name": "now", "argu', []),  # cut off
    ],
    "deepseek_v3": [
        (f"<｜tool▁calls▁begin｜>{DS_1}<｜tool▁calls▁end｜>", "", [("get_weather", ARGS)]),
        (
            f"Checking.<｜tool▁calls▁begin｜>{DS_1}\n{DS_2}<｜tool▁calls▁end｜>",
            "Checking.",
            [("get_weather", ARGS), ("now", {"tz": "UTC"})],
        ),
        (
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>x\n```json\n{bad\n```<｜tool▁call▁end｜>",
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>x\n```json\n{bad\n```<｜tool▁call▁end｜>",
            [],
        ),
        ("plain answer", "plain answer", []),
    ],
    "mistral": [
        (f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {A}}}]', "", [("get_weather", ARGS)]),
        (
            f'Sure. [TOOL_CALLS][{{"name": "get_weather", "arguments": {A}}}, {{"name": "now", "arguments": {B}}}]',
            "Sure. ",
            [("get_weather", ARGS), ("now", {"tz": "UTC"})],
        ),
        (
            f"[TOOL_CALLS]get_weather[ARGS]{A}[TOOL_CALLS]now[ARGS]{B}",
            "",
            [("get_weather", ARGS), ("now", {"tz": "UTC"})],
        ),
        ('[TOOL_CALLS][{"name": "x", "arguments": ', '[TOOL_CALLS][{"name": "x", "arguments": ', []),
        ("The [TOOLS] tag is not a call.", "The [TOOLS] tag is not a call.", []),
    ],
    "llama3_json": [
        (f'{{"name": "get_weather", "parameters": {A}}}', "", [("get_weather", ARGS)]),
        (
            f'<|python_tag|>{{"name": "get_weather", "parameters": {A}}}; {{"name": "now", "parameters": {B}}}',
            "",
            [("get_weather", ARGS), ("now", {"tz": "UTC"})],
        ),
        ('The JSON {"name": "x"} is inline.', 'The JSON {"name": "x"} is inline.', []),
        ('{"name": "x", "parameters": {"a": ', '{"name": "x", "parameters": {"a": ', []),
        ('{"not": "a call"}', '{"not": "a call"}', []),
    ],
}


def _run(make: Any, text: str, chunks: list[str]) -> ParsedText:
    parser = make()
    out = ParsedText()
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    assert "".join(chunks) == text
    return out


def _chunkings(text: str, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    random_cuts = []
    for _ in range(5):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
            if len(text) > 1
            else []
        )
        random_cuts.append([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return [[text], list(text), *random_cuts]


@pytest.mark.parametrize("parser_name", list(CASES))
def test_tool_parsers_streamed_and_whole_agree(parser_name: str) -> None:
    for n, (text, content, calls) in enumerate(CASES[parser_name]):
        results = [_run(TOOL_PARSERS[parser_name], text, chunks) for chunks in _chunkings(text, n)]
        for out in results:
            assert out.content == content, (parser_name, text)
            assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls, (parser_name, text)
            assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)
            for call in out.tool_calls:
                assert call.id.startswith("call_") or (parser_name == "mistral" and len(call.id) == 9)


THINK_CASES = [
    # (parser, prompt opens reasoning, output, reasoning, content)
    ("qwen3", False, "<think>\nStep 1: 天気.\n</think>\n\nThe answer.", "Step 1: 天気.\n", "The answer."),
    ("qwen3", False, "Just an answer, no thinking.", "", "Just an answer, no thinking."),
    ("qwen3", True, "Already thinking.</think>Done.", "Already thinking.", "Done."),
    ("qwen3", False, "<think>never closed", "never closed", ""),
    ("qwen3", False, "<thin", "", "<thin"),
    ("deepseek_r1", False, "Hmm, 2+2.\n</think>\n\n4", "Hmm, 2+2.\n", "4"),
    ("deepseek_r1", False, "<think>\nHmm.</think>4", "Hmm.", "4"),
]


@pytest.mark.parametrize("case", THINK_CASES, ids=lambda c: f"{c[0]}-{c[2][:12]}")
def test_reasoning_parsers_streamed_and_whole_agree(case: tuple[str, bool, str, str, str]) -> None:
    name, opened, text, reasoning, content = case
    for chunks in _chunkings(text, 7):
        out = _run(lambda: make_reasoning_parser(name, opened), text, chunks)
        assert (out.reasoning, out.content) == (reasoning, content), chunks


@needs_shared
def test_auto_detection_from_model_files_and_templates() -> None:
    qwen3 = load_styler(str(shared_dir() / "tokenizers" / "qwen3"))
    assert (qwen3.tool_parser, qwen3.reasoning_parser) == ("hermes", "qwen3")
    assert load_styler(str(shared_dir() / "tokenizers" / "qwen2.5")).reasoning_parser == ""
    ds = load_styler(str(shared_dir() / "tokenizers" / "deepseek-v3"))
    assert ds.tool_parser == "deepseek_v3"
    none = load_styler(
        str(shared_dir() / "tokenizers" / "qwen3"), tool_parser="none", reasoning_parser="deepseek_r1"
    )
    assert (none.tool_parser, none.reasoning_parser) == ("", "deepseek_r1")
    with pytest.raises(ValueError, match="unknown"):
        load_styler(str(shared_dir() / "tokenizers" / "qwen3"), tool_parser="nope")
    templates = {p.stem: p.read_text(encoding="utf-8") for p in template_files()}
    never = lambda _token: False  # noqa: E731 - judge by the template text alone
    expected = {
        "Qwen-Qwen3-0.6B": ("hermes", "qwen3"),
        "Qwen-QwQ-32B": ("hermes", "qwen3"),
        "Qwen-Qwen2.5-7B-Instruct": ("hermes", ""),
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", ""),
        "meta-llama-Llama-3.1-8B-Instruct": ("llama3_json", ""),
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("deepseek_v3", "deepseek_r1"),
        "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", ""),
    }
    for name, (tool, reasoning) in expected.items():
        if name in templates:
            assert detect_tool_parser(never, templates[name]) == tool, name
            assert detect_reasoning_parser(never, templates[name]) == reasoning, name
