"""Chat messages as the dicts chat templates expect (what OpenAI clients send to vLLM).

Only keys that carry a value are present, so template tests such as `message.name is defined`
behave as they do for a JSON request. Tool-call arguments that are a JSON object are parsed
into a dict, because templates such as Qwen's write `arguments | tojson` (vLLM does the same).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

# JSON text may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text can carry.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, field: str) -> None:
    """ValueError naming `field` when a string in `value` (keys included) holds a lone surrogate."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ValueError(f"{field} contains a lone UTF-16 surrogate, which is not valid text")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_text(key, field)
            check_text(item, field)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_text(item, field)


def parse_arguments(arguments: str) -> Any:
    """A tool call's arguments for a template: a dict when the text is a JSON object, else the text."""
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, ValueError):
        return arguments
    return value if isinstance(value, dict) else arguments


def tool_call_dict(call_id: str, name: str, arguments: str, call_type: str = "function") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": call_type or "function",
        "function": {"name": name, "arguments": parse_arguments(arguments)},
    }


def message_dict(
    role: str,
    content: str | Sequence[Mapping[str, Any]] | None,
    *,
    name: str = "",
    tool_calls: Sequence[Mapping[str, Any]] = (),
    tool_call_id: str = "",
    reasoning_content: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One message dict; `content` is text, a list of {"type": "text", "text": ...} parts, or None."""
    if not role:
        raise ValueError("messages[].role must not be empty")
    message: dict[str, Any] = {"role": role}
    if content is None or isinstance(content, str):
        message["content"] = content
    else:
        parts = []
        for i, part in enumerate(content):
            if part.get("type") != "text":
                raise ValueError(
                    f"messages[].content[{i}].type {part.get('type')!r} is not supported (only 'text')"
                )
            parts.append({"type": "text", "text": part.get("text", "")})
        message["content"] = parts
    if name:
        message["name"] = name
    if tool_calls:
        message["tool_calls"] = [dict(c) for c in tool_calls]
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    if extra:
        message.update(extra)
    return message


def parse_json_field(text: str, field: str, expected: type) -> Any:
    """Parse a request's JSON-text field; ValueError naming the field when it is not `expected`."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field} is not valid JSON: {exc}") from exc
    if not isinstance(value, expected):
        raise ValueError(f"{field} must be a JSON {'object' if expected is dict else 'array'}")
    check_text(value, field)
    return value
