"""Structured outputs and forced tool calls end to end, with the official `openai` client and the
gRPC Inference API: the shared stack on a tiny random Qwen3 (the real Qwen3 tokenizer) for chat,
the shared stories260K stack for completions.

A random model follows no instruction, so every schema here is bounded (enum, maxLength,
maximum, maxItems): the constraint alone brings each output to its end well within max_tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from gateway_stack import Stack

from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = [pytest.mark.e2e]

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about a person and the weather."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def qwen3(qwen3_stack: Stack) -> Stack:
    return qwen3_stack


@pytest.fixture(scope="module")
def client(qwen3: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=qwen3.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _valid(value: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)


def _check_call(call: Any, names: tuple[str, ...] = tuple(SCHEMAS)) -> tuple[str, str]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    _valid(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call.function.name, call.function.arguments


def _stream_calls(stream: Any) -> dict[int, tuple[list[tuple[str, str]], str | None, str | None]]:
    """Per choice: the (name, arguments) of its streamed calls, its finish reason, its content
    (None when no delta carried any, as with a forced tool choice)."""
    calls: dict[int, dict[int, list[str]]] = {}
    finish: dict[int, str | None] = {}
    content: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content is not None:
                content[c.index] = content.get(c.index, "") + c.delta.content
            for d in c.delta.tool_calls or []:
                mine = calls.setdefault(c.index, {})
                if d.index not in mine:  # OpenAI's first delta of a call: id, type, name, arguments
                    assert d.id and d.id.startswith("call_") and d.type == "function"
                    assert d.function is not None and d.function.name and d.function.arguments is not None
                    mine[d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and d.function is not None and d.function.name is None
                mine[d.index][1] += d.function.arguments or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return {
        i: ([(n, a) for _, (n, a) in sorted(calls.get(i, {}).items())], finish.get(i), content.get(i))
        for i in finish
    }


# ---- response_format on chat -----------------------------------------------------------------


def test_json_schema_output_matches_the_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client),
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        n=3,
        seed=11,
        temperature=1.0,
        max_tokens=120,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        assert choice.message.tool_calls is None or choice.message.tool_calls == []
        _valid(json.loads(choice.message.content or ""), PERSON)


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client),
        messages=MESSAGES,
        response_format={"type": "json_object"},
        n=2,
        seed=3,
        max_tokens=48,
    )
    for choice in reply.choices:
        text = choice.message.content or ""
        assert text.startswith("{")
        # any object is allowed, so a random model may still be writing one at max_tokens
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert choice.finish_reason == "length"


def test_streamed_json_schema_equals_the_whole_response(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=_model(client),
        messages=MESSAGES,
        extra_body={"guided_json": PERSON},
        n=2,
        seed=5,
        temperature=1.0,
        max_tokens=120,
    )
    whole = client.chat.completions.create(**kwargs)
    streamed = _stream_calls(client.chat.completions.create(stream=True, **kwargs))
    for choice in whole.choices:
        calls, finish, content = streamed[choice.index]
        assert (calls, finish, content) == ([], choice.finish_reason, choice.message.content)
        _valid(json.loads(content or ""), PERSON)


# ---- forced tool calls -----------------------------------------------------------------------


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, n=2, seed=2, max_tokens=80
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"  # what OpenAI reports for a forced named function
        assert choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0], ("get_weather",))


def test_required_tool_choice_calls_tools(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client),
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=3,
        seed=4,
        temperature=1.0,
        max_tokens=100,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
    parallel = client.chat.completions.create(
        model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=9, max_tokens=160
    )
    choice = parallel.choices[0]
    # any number of calls: a random model may still be adding calls at max_tokens
    assert choice.finish_reason in ("tool_calls", "length")
    calls = choice.message.tool_calls or []
    assert calls or choice.finish_reason == "length"
    for call in calls if choice.finish_reason == "tool_calls" else calls[:-1]:
        _check_call(call)


@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_streamed_tool_calls_equal_the_whole_response(client: openai.OpenAI, tool_choice: str) -> None:
    kwargs: dict[str, Any] = dict(
        model=_model(client),
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=NAMED if tool_choice == "named" else "required",
        parallel_tool_calls=tool_choice == "named",
        n=2,
        seed=21,
        temperature=1.0,
        max_tokens=100,
    )
    whole = client.chat.completions.create(**kwargs)
    streamed = _stream_calls(client.chat.completions.create(stream=True, **kwargs))
    assert set(streamed) == {0, 1}
    for choice in whole.choices:
        calls, finish, content = streamed[choice.index]
        assert content is None and choice.message.content is None
        assert finish == choice.finish_reason == ("stop" if tool_choice == "named" else "tool_calls")
        assert calls == [_check_call(c) for c in choice.message.tool_calls or []]


# ---- the gRPC Inference API ------------------------------------------------------------------


def test_grpc_tool_choice_required_and_guided(qwen3: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{qwen3.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", text="Weather?")],
            tools_json=json.dumps(TOOLS),
            tool_choice_json=json.dumps("required"),
            parallel_tool_calls=False,
            options=inference_pb2.GenerationOptions(max_tokens=100, seed=8, temperature=1.0),
        )
        reply = stub.ChatCompletion(request, timeout=120)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.HasField("content")
        [call] = choice.message.tool_calls
        assert call.id.startswith("call_") and call.name in SCHEMAS
        _valid(json.loads(call.arguments), SCHEMAS[call.name])
        streamed: dict[int, list[str]] = {}
        finish = ""
        for chunk in stub.ChatCompletionStream(request, timeout=120):
            for c in chunk.choices:
                for d in c.tool_calls:
                    streamed.setdefault(d.index, ["", ""])
                    streamed[d.index][0] += d.name
                    streamed[d.index][1] += d.arguments
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and streamed == {0: [call.name, call.arguments]}

        guided = stub.ChatCompletion(
            inference_pb2.ChatCompletionRequest(
                messages=[common_pb2.ChatMessage(role="user", text="Person?")],
                options=inference_pb2.GenerationOptions(
                    max_tokens=120, seed=1, guided=common_pb2.GuidedDecoding(json_schema=json.dumps(PERSON))
                ),
            ),
            timeout=120,
        )
        assert guided.choices[0].finish_reason == "stop"
        _valid(json.loads(guided.choices[0].message.content), PERSON)
        with pytest.raises(grpc.RpcError) as err:
            stub.ChatCompletion(
                inference_pb2.ChatCompletionRequest(
                    messages=[common_pb2.ChatMessage(role="user", text="x")],
                    options=inference_pb2.GenerationOptions(
                        guided=common_pb2.GuidedDecoding(json_schema=json.dumps({"type": "foo"}))
                    ),
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "guided_json" in (
            err.value.details() or ""
        )


# ---- errors: a 400 naming the field, and the stack keeps serving ------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format",
            "foo",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ({"guided_regex": "(unclosed"}, "guided_regex", ""),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {"guided_choice": ["a"], "guided_regex": "a"},
            "guided_choice",
            "'guided_regex' and 'guided_choice'",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "x": 1, "properties": {"a": {"type": "nope"}}},
                        },
                    }
                ],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            "tools[0].function.parameters",
            "nope",
        ),
    ],
)
def test_bad_constraints_are_400_and_the_stack_still_serves(
    qwen3: Stack, body: dict[str, Any], param: str, words: str
) -> None:
    reply = httpx.post(
        qwen3.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
    ok = httpx.post(
        qwen3.url + "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 30, "guided_choice": ["yes", "no"]},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in ("yes", "no"), ok.text


# ---- completions on stories260K ---------------------------------------------------------------


def test_completions_guided_choice_and_regex(stories_stack: Stack) -> None:
    client = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=120)
    choices = ["happy", "sad", "a big dog"]
    reply = client.completions.create(
        model=stories_stack.model.name,
        prompt="Once upon a time",
        n=3,
        seed=1,
        max_tokens=20,
        extra_body={"guided_choice": choices},
    )
    for choice in reply.choices:
        assert choice.text in choices and choice.finish_reason == "stop"
    newer = client.completions.create(  # vLLM's newer spelling, same seed: the same choices
        model=stories_stack.model.name,
        prompt="Once upon a time",
        n=3,
        seed=1,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert [c.text for c in newer.choices] == [c.text for c in reply.choices]
    pattern = r"[a-z]{2,6} (cat|dog)\."
    reply = client.completions.create(
        model=stories_stack.model.name,
        prompt="Once upon a time",
        n=2,
        seed=2,
        max_tokens=20,
        extra_body={"guided_regex": pattern},
    )
    for choice in reply.choices:
        assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop", choice
    stream = client.completions.create(
        model=stories_stack.model.name,
        prompt="Once upon a time",
        n=2,
        seed=2,
        max_tokens=20,
        stream=True,
        extra_body={"guided_regex": pattern},
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in reply.choices]


def test_completions_json_schema_and_grpc_guided(stories_stack: Stack) -> None:
    client = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.completions.create(
        model=stories_stack.model.name,
        prompt="Once upon a time",
        max_tokens=120,
        seed=4,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    _valid(json.loads(reply.choices[0].text), PERSON)
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(
            max_tokens=20,
            n=2,
            guided=common_pb2.GuidedDecoding(choice=common_pb2.StringList(values=["up", "down"])),
        )
        whole = stub.Completion(inference_pb2.CompletionRequest(text="Once", options=options), timeout=60)
        assert {c.text for c in whole.choices} <= {"up", "down"}
        assert all(c.finish_reason == "stop" for c in whole.choices)
        texts: dict[int, str] = {}
        for chunk in stub.CompletionStream(
            inference_pb2.CompletionRequest(text="Once", options=options), timeout=60
        ):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert set(texts.values()) <= {"up", "down"} and len(texts) == 2


def test_a_worker_that_cannot_guide_gives_a_clear_400(stories_stack: Stack, tmp_path: Path) -> None:
    # the worker's model directory has no tokenizer.json (the styler's has)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(stories_stack.model / name)
    with (
        stories_stack.extra_worker("worker-unguided", tmp_path) as worker,
        stories_stack.extra_gateway("gateway-unguided", workers=[worker]) as url,
    ):
        body = {"prompt": "Once", "max_tokens": 4}
        reply = httpx.post(url + "/v1/completions", json={**body, "guided_choice": ["a", "b"]}, timeout=60)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == ("guided_choice", "guided_decoding_unavailable")
        assert "tokenizer" in error["message"]
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
