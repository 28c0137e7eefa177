"""Strict tool calls: whether a chat request gets the styler's tool-call grammar, and with what.

With `tool_choice: "auto"` a model may write a tool call or text. A strict request is decoded
under the grammar of the model's tool-call format (services/styler/parsers/tool_grammar.py): free
text until the format's opener, then a call of a listed function with arguments that match its
`parameters`, so every call the model starts parses and validates. `--strict-tools`:

- `auto` (default): when any listed function has `"strict": true` (OpenAI's per-function flag);
- `always`: every `tool_choice: "auto"` request with tools;
- `never`: off.

`tool_choice` "required" and named are constrained anyway (tool_schema.py); "none" never is.
With `response_format` json_schema / json_object (or `guided_json`), that schema constrains the
reply when it is not tool calls. A regex, choice or grammar constraint cannot be combined with the
tool grammar: that is a 400 naming the constraint's field.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.downstream import ToolGrammarRequest
from gateway.errors import invalid
from gateway.protocol import ChatRequest

STRICT_TOOLS_POLICIES = ("auto", "always", "never")


def _is_strict(tool: dict[str, Any]) -> bool:
    function = tool.get("function")
    return isinstance(function, dict) and function.get("strict") is True


def strict_tool_grammar(req: ChatRequest, policy: str) -> ToolGrammarRequest | None:
    """The grammar to ask the styler for, or None when the request's tool calls are not strict."""
    if req.tool_choice != "auto" or not req.tools or policy == "never":
        return None
    if policy == "auto" and not any(_is_strict(t) for t in req.tools):
        return None
    guided = req.params.sampling.guided
    answer = ""
    if guided is not None:
        if guided.kind == "json_schema":
            answer = guided.value
        elif guided.kind == "json_object":
            answer = json.dumps({"type": "object"})
        else:
            raise invalid(
                f"'{guided.param}' cannot be combined with strict tool calls (only a JSON schema or "
                'json_object answer can be); drop it, or send the functions without "strict": true',
                guided.param,
            )
    return ToolGrammarRequest(parallel=req.parallel_tool_calls, answer_schema=answer)
