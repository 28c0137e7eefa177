"""The strict tool-call grammar of each family, run through llguidance with real tokenizers.

Each grammar is compiled the way the worker compiles it (its llguidance tokenizer, added tokens
reachable only by id) and fed token ids: a valid call of a listed tool is accepted and parses with
the family's own parser; a wrong name, wrong arguments or an opener spelled out in free text is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest

from services.styler.parsers.base import ParsedText
from services.styler.parsers.tool_formats import TOOL_PARSERS
from services.styler.parsers.tool_grammar import ToolGrammarSpec, compile_tool_grammar
from services.styler.tokenizer import Tokenizer
from services.worker.grammar_check import llg_tokenizer

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/num"}},
                "required": ["a", "b"],
                "additionalProperties": False,
                "$defs": {"num": {"type": "integer", "minimum": 0}},
            },
        },
    },
    {"type": "function", "function": {"name": "no_params"}},
]


class Family:
    """One family on one tokenizer: compile, then check texts against the grammar."""

    def __init__(self, shared_dir: Path, tokenizer: str, family: str) -> None:
        self.tok = Tokenizer.from_dir(str(shared_dir / "tokenizers" / tokenizer))
        self.family = family
        text = (shared_dir / "tokenizers" / tokenizer / "tokenizer.json").read_text()
        self.llg = llg_tokenizer(text, self.tok.vocab_size, list(self.tok.info().eos_token_ids))

    def grammar(self, **spec: Any) -> str:
        return compile_tool_grammar(
            self.family, ToolGrammarSpec(**{"tools": TOOLS, **spec}), self.tok.added_token_id
        )

    def ids(self, *pieces: str) -> list[int]:
        """Each piece tokenized on its own (so a marker split over pieces stays ordinary text)."""
        return [t for p in pieces for t in self.tok.encode(p, add_special_tokens=False)]

    def accepts(self, grammar: str, *pieces: str) -> bool:
        """The whole text is a complete sentence of the grammar."""
        matcher = llguidance.LLMatcher(self.llg, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = self.ids(*pieces)
        return (
            matcher.validate_tokens(ids) == len(ids)
            and matcher.consume_tokens(ids)
            and matcher.is_accepting()
        )

    def prefix_ok(self, grammar: str, *pieces: str) -> bool:
        """The text can still be continued into a sentence."""
        matcher = llguidance.LLMatcher(self.llg, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        ids = self.ids(*pieces)
        return matcher.validate_tokens(ids) == len(ids)

    def parse(self, text: str) -> ParsedText:
        parser = TOOL_PARSERS[self.family]()
        out = parser.feed(text)
        out.extend(parser.finish())
        return out


@pytest.fixture(scope="module")
def hermes(shared_dir: Path) -> Family:
    return Family(shared_dir, "qwen3", "hermes")


@pytest.fixture(scope="module")
def deepseek(shared_dir: Path) -> Family:
    return Family(shared_dir, "deepseek-v3", "deepseek_v3")


@pytest.fixture(scope="module")
def llama(shared_dir: Path) -> Family:
    return Family(shared_dir, "llama3.1", "llama3_json")


@pytest.fixture(scope="module")
def mistral(shared_dir: Path) -> Family:
    # No Mistral tokenizer in ../shared: its marker is ordinary text here (the lazy-trigger path).
    return Family(shared_dir, "qwen3", "mistral")


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'


def test_hermes_openers_are_tokens_and_calls_are_listed_tools(hermes: Family) -> None:
    g = hermes.grammar()
    opener = hermes.tok.added_token_id("<tool_call>")
    assert opener is not None and f"<[{opener}]>" in g
    assert hermes.accepts(g, "Let me check.")
    assert hermes.accepts(g, "")
    assert hermes.accepts(g, "<think>\nhmm\n</think>\n\n", f"<tool_call>\n{WEATHER}\n</tool_call>")
    text = f"ok <tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{ADD}\n</tool_call> done"
    assert hermes.accepts(g, text)
    calls = hermes.parse(text).tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert hermes.accepts(g, '<tool_call>\n{"name": "no_params", "arguments": {"x": [1]}}\n</tool_call>')
    # an unlisted function, arguments off the schema, a $ref'd definition violated, no JSON at all
    assert not hermes.prefix_ok(g, '<tool_call>\n{"name": "rm_rf"')
    assert not hermes.prefix_ok(g, '<tool_call>\n{"name": "get_weather", "arguments": {"town"')
    assert not hermes.prefix_ok(g, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": -')
    assert not hermes.prefix_ok(g, "<tool_call>\nhello")
    # the call must be closed before more text; the opener never appears spelled out in text
    assert not hermes.accepts(g, f"<tool_call>\n{WEATHER}\n")
    assert not hermes.prefix_ok(g, "text <tool", "_call>")


def test_hermes_single_call_when_not_parallel(hermes: Family) -> None:
    g = hermes.grammar(parallel=False)
    one = f"<tool_call>\n{WEATHER}\n</tool_call>"
    assert hermes.accepts(g, "a ", one, " b")
    assert not hermes.prefix_ok(g, one, one)


def test_hermes_without_the_tokens_uses_a_text_trigger(shared_dir: Path) -> None:
    family = Family(shared_dir, "llama3.1", "hermes")  # no <tool_call> token in Llama's vocabulary
    g = family.grammar()
    assert "[lazy]" in g and "<[" not in g
    assert family.accepts(g, f"x <tool_call>\n{WEATHER}\n</tool_call> y")
    assert not family.prefix_ok(g, 'x <tool_call>\n{"name": "nope"')


def test_hermes_answer_schema_replaces_free_text(hermes: Family) -> None:
    answer = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    g = hermes.grammar(answer_schema=answer)
    assert hermes.accepts(g, '{"ok": true}')
    assert hermes.accepts(g, f"<tool_call>\n{WEATHER}\n</tool_call>")
    assert not hermes.prefix_ok(g, "Sure")
    assert not hermes.prefix_ok(g, '{"nope"')


def test_deepseek_v3_calls_block(deepseek: Family) -> None:
    g = deepseek.grammar()
    call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{}\n```<｜tool▁call▁end｜>"
    weather = call.replace("{}", '{"city": "Rome"}')
    add = call.replace("get_weather", "add").replace("{}", '{"a": 3, "b": 4}')
    text = f"Checking.<｜tool▁calls▁begin｜>{weather}\n{add}<｜tool▁calls▁end｜>"
    assert deepseek.accepts(g, text)
    calls = deepseek.parse(text).tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"}),
        ("add", {"a": 3, "b": 4}),
    ]
    assert not deepseek.prefix_ok(g, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>other")
    wrong_arguments = call.replace("{}", '{"a": 1}')
    assert not deepseek.prefix_ok(g, "<｜tool▁calls▁begin｜>" + wrong_arguments)
    assert not deepseek.accepts(
        deepseek.grammar(parallel=False), f"<｜tool▁calls▁begin｜>{weather}{add}<｜tool▁calls▁end｜>"
    )


def test_mistral_text_marker_then_calls_to_the_end(mistral: Family) -> None:
    g = mistral.grammar()
    assert "[lazy]" in g
    text = f"Sure. [TOOL_CALLS][{WEATHER}, {ADD}]"
    assert mistral.accepts(g, text)
    assert [c.name for c in mistral.parse(text).tool_calls] == ["get_weather", "add"]
    assert mistral.accepts(g, "no calls [TOOL here")
    assert not mistral.prefix_ok(g, f"[TOOL_CALLS][{WEATHER}] and more")
    assert not mistral.prefix_ok(g, '[TOOL_CALLS][{"name": "x"')
    assert not mistral.accepts(mistral.grammar(parallel=False), f"[TOOL_CALLS][{WEATHER}, {ADD}]")


def test_llama3_json_message_is_text_or_calls(llama: Family) -> None:
    g = llama.grammar()
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert llama.accepts(g, "The weather is fine {really}.")
    assert llama.accepts(g, f"{call}; {call}")
    assert [c.name for c in llama.parse(f"{call}; {call}").tool_calls] == ["get_weather", "get_weather"]
    assert not llama.prefix_ok(g, "  {")  # a message starting with `{` after whitespace is a call
    assert not llama.prefix_ok(g, '{"name": "get_weather", "arguments"')
    assert not llama.prefix_ok(g, "<|python_tag|>")
    with pytest.raises(ValueError, match=r"^response_format: "):
        llama.grammar(answer_schema='{"type": "object"}')


def test_refusals_name_the_field(hermes: Family) -> None:
    clash = [
        TOOLS[1],
        {
            "type": "function",
            "function": {
                "name": "sub",
                "parameters": {"type": "object", "$defs": {"num": {"type": "string"}}},
            },
        },
    ]
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.parameters\.\$defs\.num: "):
        hermes.grammar(tools=clash)
    with pytest.raises(ValueError, match=r"^tools: "):
        hermes.grammar(tools=[])
    with pytest.raises(ValueError, match=r"^tools: .*'harmony'"):
        compile_tool_grammar("harmony", ToolGrammarSpec(TOOLS), hermes.tok.added_token_id)
    with pytest.raises(ValueError, match=r"^response_format: "):
        hermes.grammar(answer_schema="[1, 2")


def test_hermes_grammar_keeps_reasoning_and_the_stream_parsers_intact(
    hermes: Family, shared_dir: Path
) -> None:
    """Thinking text, then content, then a call: the grammar takes those very token ids, and the
    styler's stream (reasoning + tool parser, token by token) splits them as without a grammar."""
    from services.styler.stream import StreamOptions
    from services.styler.styler import Styler, StylerOptions

    g = hermes.grammar()
    thought = "<think>\nThe user wants weather. 天气\n</think>\n\n"
    call = f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>"
    assert hermes.accepts(g, thought + call)
    assert hermes.accepts(g, "still thinking</think>\n\n" + call)  # a prompt that opened <think>
    styler = Styler.load(StylerOptions(model=str(shared_dir / "tokenizers" / "qwen3")))
    try:
        ids = styler.tokenize(thought + call, add_special_tokens=False)
        assert ids == hermes.ids(thought + call)
        session = styler.open_stream(StreamOptions(tool_parser="auto", reasoning_parser="auto"))
        deltas = [session.add(0, [t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    finally:
        styler.close()
    assert "".join(d.reasoning_text for d in deltas) == "The user wants weather. 天气\n"
    assert "".join(d.text for d in deltas) == "Let me check.\n"
    calls = [(c.name, json.loads(c.arguments)) for d in deltas for c in d.tool_calls]
    assert calls == [("get_weather", {"city": "Paris"})]
