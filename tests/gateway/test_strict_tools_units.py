"""When a chat request gets the strict tool-call grammar (`--strict-tools`), and what is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import GatewayConfig
from gateway.downstream import ToolGrammarRequest
from gateway.errors import APIError
from gateway.strict_tools import strict_tool_grammar
from gateway.validation import parse_chat

MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def body(strict: bool | None = None, **extra: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": "get_weather", "parameters": PARAMS}
    if strict is not None:
        function["strict"] = strict
    other = {"type": "function", "function": {"name": "get_time"}}
    return {"messages": MESSAGES, "tools": [other, {"type": "function", "function": function}], **extra}


def grammar(policy: str, request: dict[str, Any]) -> ToolGrammarRequest | None:
    return strict_tool_grammar(parse_chat(request), policy)


def test_policy_auto_follows_the_functions_strict_flag() -> None:
    assert grammar("auto", body(strict=True)) == ToolGrammarRequest(parallel=True)
    assert grammar("auto", body(strict=True, parallel_tool_calls=False)) == ToolGrammarRequest(parallel=False)
    assert grammar("auto", body()) is None
    assert grammar("auto", body(strict=False)) is None
    assert grammar("always", body()) == ToolGrammarRequest(parallel=True)
    assert grammar("never", body(strict=True)) is None
    assert GatewayConfig().strict_tools == "auto"


def test_only_tool_choice_auto_gets_the_grammar() -> None:
    assert grammar("always", body(tool_choice="none")) is None
    # required / named are constrained by their own JSON schema (tool_schema.py)
    assert grammar("always", body(tool_choice="required")) is None
    named = {"type": "function", "function": {"name": "get_time"}}
    assert grammar("always", body(tool_choice=named)) is None
    assert grammar("always", {"messages": MESSAGES}) is None


def test_a_json_answer_constrains_the_text_that_is_not_calls() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    got = grammar("auto", body(strict=True, response_format=fmt))
    assert got is not None and json.loads(got.answer_schema) == schema
    got = grammar("auto", body(strict=True, response_format={"type": "json_object"}))
    assert got is not None and json.loads(got.answer_schema) == {"type": "object"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "[a-z]+"}, "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"guided_grammar": "start: /x/"}, "guided_grammar"),
        ({"structured_outputs": {"regex": "x"}}, "structured_outputs"),
    ],
)
def test_other_constraints_cannot_be_combined(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        grammar("auto", body(strict=True, **extra))
    assert err.value.status == 400 and err.value.param == param
    assert "strict tool calls" in err.value.message
    assert grammar("auto", body(**extra)) is None  # not strict: the constraint applies as before


def test_strict_must_be_a_boolean() -> None:
    with pytest.raises(APIError) as err:
        parse_chat(body(strict="yes"))  # type: ignore[arg-type]
    assert err.value.param == "tools[1].function.strict"


def test_tandem_up_forwards_strict_tools() -> None:
    from tandem.up import UpConfig, forwarded_gateway_args

    assert "--strict-tools" not in forwarded_gateway_args(UpConfig())
    assert forwarded_gateway_args(UpConfig(strict_tools="always"))[-2:] == ["--strict-tools", "always"]
