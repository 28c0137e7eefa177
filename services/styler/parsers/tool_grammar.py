"""Strict tool calls: the grammar that makes every call a model starts a valid call of a listed tool.

`compile_tool_grammar(family, spec, added_token_id)` writes a grammar in llguidance's Lark dialect
for one request of `tool_choice: "auto"`: free text until the family's tool-call opener, then the
family's envelope around a call whose function name is one of the listed tools and whose
arguments match that tool's `parameters` schema (one alternative per tool), then free text or the
end (more calls where the family writes several). The worker enforces it token by token, so a
call the model starts can only end as a call the family's parser (tool_formats.py) accepts.

| family        | what the grammar allows                                                          |
| ------------- | -------------------------------------------------------------------------------- |
| `hermes`      | text (`<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>` text)*        |
| `deepseek_v3` | text [`<｜tool▁calls▁begin｜>` (`<｜tool▁call▁begin｜>function<｜tool▁sep｜>N\\n```json\\n` |
|               | `{...}\\n```<｜tool▁call▁end｜>`)+ `<｜tool▁calls▁end｜>` text]                       |
| `mistral`     | text [`[TOOL_CALLS][{"name": N, "arguments": {...}}, ...]`] (the calls end it)     |
| `llama3_json` | text that does not start with `{`, or `{"name": N, "parameters": {...}}` (`; `-separated) |

Openers and closers that are single added tokens of the tokenizer are written as that token
(`<[id]>`), the only way the model can produce them there: free text cannot hold a referenced
token. Free text also never holds an opener spelled out in ordinary tokens, because the family's
parser would take that text for a call. With `parallel` false, at most one call.

`answer_schema` (the request's `response_format`): the reply is then either one JSON value of
that schema or tool calls, with no free text. llama3_json cannot express it (an answer object and
a call both start with `{`), so it is a ValueError there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.unreachable_tokens import unreachable_text
from services.styler.parsers.tool_formats import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    MISTRAL_MARKER,
    PYTHON_TAG,
)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"

# JSON written as `{"a": 1, "b": [2, 3]}`, as the worker writes guided JSON (grammar_check.py):
# with free whitespace small models loop on spaces and newlines.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Any text (llguidance terminals are byte regexes; `.` is any character but a newline).
_ANY = r"/(.|\n)*/"
_DEFINITIONS = ("$defs", "definitions")
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolGrammarSpec:
    """What one request's grammar is made of."""

    tools: Sequence[Mapping[str, Any]]  # OpenAI `tools` ({"type": "function", "function": {...}})
    parallel: bool = True  # several calls in one reply (`parallel_tool_calls`)
    answer_schema: str = ""  # JSON schema text the non-tool reply must match ("" = free text)


# Looks a text up as a single added token of the tokenizer: its id, or None.
AddedTokenId = Callable[[str], "int | None"]


def compile_tool_grammar(family: str, spec: ToolGrammarSpec, added_token_id: AddedTokenId) -> str:
    """The Lark grammar for `family` (a tool parser name); ValueError naming the request field
    ("tools...", "response_format") when the tools or the answer cannot be expressed."""
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"tools: strict tool calls are not available for tool-call format {family!r}")
    if not spec.tools:
        raise ValueError("tools: strict tool calls need at least one tool")
    answer = _answer(spec.answer_schema) if spec.answer_schema else None
    return builder(_Grammar(added_token_id), spec, answer)


# ---- pieces -----------------------------------------------------------------------------------


class _Grammar:
    """Lark text under construction: rules in order, markers written as tokens where they are."""

    def __init__(self, added_token_id: AddedTokenId) -> None:
        self._token_id = added_token_id
        self.rules: list[str] = ["%llguidance {}"]

    def marker(self, text: str) -> str:
        token = self._token_id(text)
        return f"<[{token}]>" if token is not None else _lit(text)

    def is_token(self, text: str) -> bool:
        return self._token_id(text) is not None

    def add(self, rule: str) -> None:
        self.rules.append(rule)

    def text_terminal(
        self, name: str, excluded: tuple[str, ...], excluded_at_start: tuple[str, ...] = ()
    ) -> None:
        """`name`: any text that holds none of `excluded` and (after leading whitespace) does not
        start with any of `excluded_at_start`. A marker that is an added token is excluded in the
        spelling the worker's llguidance tokenizer gives that token too: free text would
        otherwise take the token itself as text."""
        excluded = tuple(self._spellings(excluded))
        excluded_at_start = tuple(self._spellings(excluded_at_start))
        # One negation of an alternation: a negation per marker multiplies the lexer's states.
        parts = [_ANY]
        if excluded:
            parts.append(f"~({_ANY} ({' | '.join(map(_lit, excluded))}) {_ANY})")
        if excluded_at_start:
            parts.append(rf"~(/[ \t\r\n]*/ ({' | '.join(map(_lit, excluded_at_start))}) {_ANY})")
        self.add(f"{name}: {' & '.join(parts)}")

    def _spellings(self, markers: tuple[str, ...]) -> list[str]:
        out = []
        for marker in markers:
            out.append(marker)
            token = self._token_id(marker)
            if token is not None:
                out.append(unreachable_text(token))
        return out

    def opener_rule(self, name: str, opener: str) -> None:
        """`name`: free text up to and including `opener`. A token opener follows TEXT; a text
        opener ends a lazy lexeme (the shortest text that ends with it: its first occurrence)."""
        if self.is_token(opener):
            self.add(f"{name}: TEXT {self.marker(opener)}")
        else:
            self.add(f"{name}[lazy]: {_ANY} {_lit(opener)}")

    def text(self) -> str:
        return "\n".join(self.rules) + "\n"


def _lit(text: str) -> str:
    """A Lark string literal (JSON escapes; non-ASCII kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def _json(schema: dict[str, Any]) -> str:
    styled = dict(schema)
    styled.setdefault("x-guidance", JSON_STYLE)
    return "%json " + json.dumps(styled, ensure_ascii=False)


def _function(tool: Mapping[str, Any], i: int) -> tuple[str, dict[str, Any]]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"tools[{i}].function.name: must be a non-empty string")
    params = function.get("parameters")
    if params is None:
        params = ANY_OBJECT
    if not isinstance(params, dict):
        raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema object")
    return function["name"], params


def _functions(spec: ToolGrammarSpec) -> list[tuple[str, dict[str, Any]]]:
    return [_function(tool, i) for i, tool in enumerate(spec.tools)]


def _call_union(spec: ToolGrammarSpec, arguments_key: str) -> dict[str, Any]:
    """One JSON object per call, `{"name": N, <arguments_key>: <N's parameters>}`, any listed N.
    Each tool's definitions move to the root, where its `$ref`s ("#/$defs/...") point once the
    schema is nested; two tools defining one name differently cannot share that root."""
    definitions: dict[str, dict[str, Any]] = {key: {} for key in _DEFINITIONS}
    calls = []
    for i, (name, params) in enumerate(_functions(spec)):
        params = copy.deepcopy(params)
        for key in _DEFINITIONS:
            found = params.pop(key, None) or {}
            if not isinstance(found, dict):
                raise ValueError(f"tools[{i}].function.parameters.{key}: must be an object")
            for def_name, definition in found.items():
                if definitions[key].get(def_name, definition) != definition:
                    raise ValueError(
                        f"tools[{i}].function.parameters.{key}.{def_name}: differs from another tool's "
                        "definition of the same name; strict tool calls put all tools in one schema"
                    )
                definitions[key][def_name] = definition
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, arguments_key: params},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    for key, found in definitions.items():
        if found:
            schema[key] = found
    return schema


def _answer(schema_text: str) -> dict[str, Any]:
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"response_format: the schema is not valid JSON ({exc})") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError("response_format: the schema must be a JSON object")
    return schema


def _repeat(item: str, separator: str, parallel: bool) -> str:
    """`item`, or one or more `item`s separated by `separator` (a Lark expression) when parallel."""
    return f"{item} ({separator} {item})*" if parallel else item


# ---- families ---------------------------------------------------------------------------------


def _hermes(g: _Grammar, spec: ToolGrammarSpec, answer: dict[str, Any] | None) -> str:
    close = g.marker(HERMES_CLOSE)
    g.add(f'call_body: "\\n" {_json(_call_union(spec, "arguments"))} "\\n" {close}')
    if answer is not None:
        g.add(f"start: {_json(answer)} | calls")
        g.add(f"calls: {_repeat(f'{g.marker(HERMES_OPEN)} call_body', _lit(chr(10)), spec.parallel)}")
        return g.text()
    g.add("start: (opener call_body)* TEXT" if spec.parallel else "start: TEXT | opener call_body TEXT")
    g.opener_rule("opener", HERMES_OPEN)
    g.text_terminal("TEXT", (HERMES_OPEN,))
    return g.text()


def _deepseek_v3(g: _Grammar, spec: ToolGrammarSpec, answer: dict[str, Any] | None) -> str:
    alternatives = []
    for i, (name, params) in enumerate(_functions(spec)):
        if "\n" in name:
            raise ValueError(f"tools[{i}].function.name: must not hold a newline")
        alternatives.append(f"fn_{i}")
        g.add(f'fn_{i}: {_lit(name + chr(10) + "```json" + chr(10))} {_json(params)} "\\n```"')
    call = f'{g.marker(DS_CALL_BEGIN)} "function" {g.marker(DS_SEP)} ({" | ".join(alternatives)}) {g.marker(DS_CALL_END)}'
    g.add(f"call: {call}")
    g.add(f"calls: {_repeat('call', _lit(chr(10)) + '?', spec.parallel)} {g.marker(DS_CALLS_END)}")
    if answer is not None:
        g.add(f"start: {_json(answer)} | {g.marker(DS_CALLS_BEGIN)} calls")
        return g.text()
    g.add("start: TEXT | opener calls TEXT")
    g.opener_rule("opener", DS_CALLS_BEGIN)
    # The parser opens a call at any call-begin marker and drops the calls-block markers.
    g.text_terminal("TEXT", (DS_CALLS_BEGIN, DS_CALL_BEGIN, DS_CALLS_END))
    return g.text()


def _mistral(g: _Grammar, spec: ToolGrammarSpec, answer: dict[str, Any] | None) -> str:
    array: dict[str, Any] = {"type": "array", "items": _call_union(spec, "arguments"), "minItems": 1}
    for key in _DEFINITIONS:  # `$ref`s point at the root: the array's
        if key in array["items"]:
            array[key] = array["items"].pop(key)
    if not spec.parallel:
        array["maxItems"] = 1
    # The calls are the rest of the message: the parser takes everything after the marker.
    g.add(f"calls: {_json(array)}")
    if answer is not None:
        g.add(f"start: {_json(answer)} | {g.marker(MISTRAL_MARKER)} calls")
        return g.text()
    g.add("start: TEXT | opener calls")
    g.opener_rule("opener", MISTRAL_MARKER)
    g.text_terminal("TEXT", (MISTRAL_MARKER,))
    return g.text()


def _llama3_json(g: _Grammar, spec: ToolGrammarSpec, answer: dict[str, Any] | None) -> str:
    if answer is not None:
        raise ValueError(
            "response_format: cannot be combined with strict tool calls for the llama3_json tool-call "
            "format (an answer object and a call both start with '{'); turn strict tool calls off"
        )
    # The whole message is the calls when it starts with `{` (or the python tag) after whitespace.
    tag = f"{g.marker(PYTHON_TAG)}? " if g.is_token(PYTHON_TAG) else ""
    g.add(f"start: TEXT | {tag}calls")
    g.add(f"calls: {_repeat('call', _lit('; '), spec.parallel)}")
    g.add(f"call: {_json(_call_union(spec, 'parameters'))}")
    g.text_terminal("TEXT", (), excluded_at_start=("{", PYTHON_TAG))
    return g.text()


_BUILDERS: dict[str, Callable[[_Grammar, ToolGrammarSpec, dict[str, Any] | None], str]] = {
    "hermes": _hermes,
    "deepseek_v3": _deepseek_v3,
    "mistral": _mistral,
    "llama3_json": _llama3_json,
}
STRICT_TOOL_FAMILIES = tuple(_BUILDERS)
