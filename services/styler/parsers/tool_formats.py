"""The tool-call formats of each model family and the parsers built from them.

| name          | models                         | what the model writes                                             |
| ------------- | ------------------------------ | ----------------------------------------------------------------- |
| `hermes`      | Qwen2.5, Qwen3, QwQ, Hermes    | `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (n×)   |
| `llama3_json` | Llama 3.1 / 3.2                | `{"name": ..., "parameters": {...}}` as the whole message, maybe   |
|               |                                | after `<|python_tag|>`, several separated by `;`                  |
| `mistral`     | Mistral / Mistral-Nemo         | `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or          |
|               |                                | `[TOOL_CALLS]name[ARGS]{...}` (n×)                                |
| `deepseek_v3` | DeepSeek-V3 / R1               | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name` |
|               |                                | ```` ```json {...} ``` ````<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>   |
| `harmony`     | gpt-oss                        | `<|channel|>commentary to=functions.name <|constrain|>json`        |
|               |                                | `<|message|>{...}<|call|>` among its other channels (harmony.py)   |
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from services.styler.parsers.base import ToolParser, mistral_call_id
from services.styler.parsers.block_tool_parser import BlockToolParser, CallSpec
from services.styler.parsers.harmony import HARMONY_MARKERS, HarmonyParser
from services.styler.parsers.region_tool_parser import RegionToolParser

_DECODER = json.JSONDecoder()


def _arguments_text(value: Any) -> str | None:
    """Arguments as JSON text: objects are serialized; a string must itself be a JSON object."""
    if value is None:
        return "{}"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return json.dumps(parsed, ensure_ascii=False) if isinstance(parsed, dict) else None
    return None


def _call_from_object(obj: Any, argument_keys: tuple[str, ...]) -> CallSpec | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    arguments = _arguments_text(obj.get(key) if key else None)
    return None if arguments is None else (obj["name"], arguments)


def _json_values(text: str, separators: str) -> list[Any] | None:
    """All JSON values in `text`, separated by whitespace or `separators`; None if anything else."""
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


# -- hermes -----------------------------------------------------------------------------------


def parse_hermes_block(body: str) -> list[CallSpec] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    call = _call_from_object(obj, ("arguments", "parameters"))
    return None if call is None else [call]


def hermes() -> ToolParser:
    return BlockToolParser("hermes", "<tool_call>", "</tool_call>", parse_hermes_block)


# -- deepseek_v3 ------------------------------------------------------------------------------

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# V3 / R1: "function<sep>name\n```json\n{...}\n```"; V3.1: "name<sep>{...}".
_DS_FENCED = re.compile(
    r"^\s*(?P<type>\w*)" + re.escape(DS_SEP) + r"(?P<name>[^\n]+)\n```(?:json)?\s*\n?(?P<args>.*?)\s*```\s*$",
    re.S,
)
_DS_PLAIN = re.compile(r"^\s*(?P<name>[^\n<]+?)" + re.escape(DS_SEP) + r"(?P<args>.*?)\s*$", re.S)


def parse_deepseek_v3_block(body: str) -> list[CallSpec] | None:
    match = _DS_FENCED.match(body) or _DS_PLAIN.match(body)
    if match is None:
        return None
    arguments = _arguments_text(match.group("args"))
    name = match.group("name").strip()
    return None if arguments is None or not name else [(name, arguments)]


def deepseek_v3() -> ToolParser:
    return BlockToolParser(
        "deepseek_v3",
        DS_CALL_BEGIN,
        DS_CALL_END,
        parse_deepseek_v3_block,
        silent=(DS_CALLS_BEGIN, DS_CALLS_END),
    )


# -- mistral ----------------------------------------------------------------------------------

MISTRAL_MARKER = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"


def parse_mistral_region(region: str) -> list[CallSpec] | None:
    body = region.removeprefix(MISTRAL_MARKER)
    values = _json_values(body, "")
    if values is not None and values:
        calls: list[CallSpec] = []
        for value in values:
            for obj in value if isinstance(value, list) else [value]:
                call = _call_from_object(obj, ("arguments", "parameters"))
                if call is None:
                    return None
                calls.append(call)
        return calls or None
    # Tokenizer v11+: name[ARGS]{...}, repeated with [TOOL_CALLS] between calls.
    calls = []
    for piece in body.split(MISTRAL_MARKER):
        if not piece.strip():
            continue
        name, sep, args = piece.partition(_MISTRAL_ARGS)
        arguments = _arguments_text(args.strip()) if sep else None
        if arguments is None or not name.strip():
            return None
        calls.append((name.strip(), arguments))
    return calls or None


def mistral() -> ToolParser:
    return RegionToolParser("mistral", (MISTRAL_MARKER,), parse_mistral_region, make_id=mistral_call_id)


# -- llama3_json ------------------------------------------------------------------------------

PYTHON_TAG = "<|python_tag|>"


def parse_llama3_region(region: str) -> list[CallSpec] | None:
    body = region.strip().removeprefix(PYTHON_TAG)
    values = _json_values(body, ";")
    if not values:
        return None
    calls: list[CallSpec] = []
    for value in values:
        call = _call_from_object(value, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
    return calls


def llama3_json() -> ToolParser:
    return RegionToolParser("llama3_json", (PYTHON_TAG, "{"), parse_llama3_region, at_start_only=True)


def harmony() -> ToolParser:
    """Calls only (the analysis channel is content); with the `harmony` reasoning parser too,
    one HarmonyParser does both (stream.py)."""
    return HarmonyParser("harmony", reasoning=False, tools=True)


TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": hermes,
    "llama3_json": llama3_json,
    "mistral": mistral,
    "deepseek_v3": deepseek_v3,
    "harmony": harmony,
}
# Text each format relies on; when one is a special token the stream keeps it while decoding.
TOOL_MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": (PYTHON_TAG,),
    "mistral": (MISTRAL_MARKER, _MISTRAL_ARGS),
    "deepseek_v3": (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP),
    "harmony": HARMONY_MARKERS,
}
