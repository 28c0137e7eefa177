"""Forced tool calls as guided decoding: the JSON schema the output must match (vLLM's approach).

- named (`tool_choice: {"type": "function", "function": {"name": N}}`): the output is N's arguments,
  so the schema is N's `parameters` (absent: any object).
- `required`: the output is a non-empty JSON array of calls, each `{"name": <a tool>, "parameters":
  <its arguments>}` (vLLM `get_json_schema_from_tools`); `maxItems: 1` when `parallel_tool_calls`
  is false. Each tool's `$defs` move to the root, where its `$ref`s ("#/$defs/...") point once the
  schema is nested.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from gateway.downstream import Guided
from gateway.errors import invalid
from gateway.structured_output import schema_text

# What a tool without `parameters` takes (OpenAI: "omitting parameters defines a function with an
# empty parameter list"); any object, so a model may still pass an empty one.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

# Keywords holding definitions that `$ref`s address from the schema's root.
_DEFINITIONS = ("$defs", "definitions")


@dataclass(frozen=True)
class ForcedToolChoice:
    """`tool_choice` that forces a call: "required", or "named" with the function's name."""

    mode: str  # "required" | "named"
    name: str = ""  # named: the function


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = (tool.get("function") or {}).get("parameters")
    return params if isinstance(params, dict) else ANY_OBJECT


def _find(tools: list[dict[str, Any]], name: str) -> int:
    for i, tool in enumerate(tools):
        if (tool.get("function") or {}).get("name") == name:
            return i
    raise invalid(f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")


def named_schema(tools: list[dict[str, Any]], name: str) -> Guided:
    i = _find(tools, name)
    return Guided(
        "json_schema",
        schema_text(_parameters(tools[i]), f"tools[{i}].function.parameters"),
        param=f"tools[{i}].function.parameters",
    )


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    definitions: dict[str, dict[str, Any]] = {key: {} for key in _DEFINITIONS}
    calls = []
    for i, tool in enumerate(tools):
        params = copy.deepcopy(_parameters(tool))
        for key in _DEFINITIONS:
            for def_name, definition in (params.pop(key, None) or {}).items():
                if definitions[key].get(def_name, definition) != definition:
                    raise invalid(
                        f"'tools[{i}].function.parameters.{key}.{def_name}' differs from another tool's "
                        f"definition of the same name; with tool_choice 'required' all tools share one "
                        f"schema, so the definitions must agree",
                        "tools",
                    )
                definitions[key][def_name] = definition
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool["function"]["name"]]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
                # Beyond vLLM: only name and parameters become the call, so other keys would be
                # generated for nothing (and a weak model may never stop generating them).
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    for key, found in definitions.items():
        if found:
            schema[key] = found
    return schema


def forced_guided(tools: list[dict[str, Any]], choice: ForcedToolChoice, parallel_tool_calls: bool) -> Guided:
    """The constraint that makes the output the forced call(s)."""
    if choice.mode == "named":
        return named_schema(tools, choice.name)
    return Guided(
        "json_schema", schema_text(required_schema(tools, parallel_tool_calls), "tools"), param="tools"
    )
