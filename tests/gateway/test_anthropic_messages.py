"""Anthropic's Messages API through the real stack, driven by the official `anthropic` SDK.

stories260K for plain text (greedy output equals the chat route's), a tiny random Qwen3 (the real
Qwen3 tokenizer and template) for tools, tool results and thinking blocks.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def _client(stack: Stack, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0, timeout=60, **kwargs)


def test_create_equals_the_chat_route(stories_stack: Stack) -> None:
    client = _client(stories_stack)
    message = client.messages.create(
        model=stories_stack.model.name,
        max_tokens=24,
        extra_body={"temperature": 0},
        system="You tell stories.",
        messages=[{"role": "user", "content": "Once upon a time"}],
    )
    chat = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused").chat.completions.create(
        model=stories_stack.model.name,
        max_tokens=24,
        extra_body={"temperature": 0},
        messages=[
            {"role": "system", "content": "You tell stories."},
            {"role": "user", "content": "Once upon a time"},
        ],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert message.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    assert chat.usage is not None
    assert message.usage.input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens


def test_stream_events_add_up_to_the_message(stories_stack: Stack) -> None:
    client = _client(stories_stack)
    kwargs: dict[str, Any] = {
        "model": stories_stack.model.name,
        "max_tokens": 32,
        "extra_body": {"temperature": 0},
        "messages": [{"role": "user", "content": "Once upon a time"}],
    }
    whole = client.messages.create(**kwargs)
    types = []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            types.append(event.type)
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_start" in types and "content_block_delta" in types and "message_delta" in types
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_report_the_match(stories_stack: Stack) -> None:
    client = _client(stories_stack)
    base = client.messages.create(
        model=stories_stack.model.name,
        max_tokens=48,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Once upon a time"}],
    )
    text = base.content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.messages.create(
        model=stories_stack.model.name,
        max_tokens=48,
        extra_body={"temperature": 0},
        stop_sequences=[stop],
        messages=[{"role": "user", "content": "Once upon a time"}],
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in cut.content[0].text  # type: ignore[union-attr]


def test_count_tokens_equals_the_rendered_prompt(stories_stack: Stack) -> None:
    client = _client(stories_stack)
    messages: Any = [{"role": "user", "content": "Once upon a time"}]
    counted = client.messages.count_tokens(
        model=stories_stack.model.name, system="Be brief.", messages=messages
    )
    rendered = httpx.post(
        stories_stack.url + "/tokenize",
        json={"messages": [{"role": "system", "content": "Be brief."}, *messages]},
        timeout=30,
    ).json()
    assert counted.input_tokens == rendered["count"]


def test_errors_use_anthropics_envelope(stories_stack: Stack) -> None:
    client = _client(stories_stack)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=stories_stack.model.name,
            max_tokens=8,
            extra_body={"temperature": 7.0},
            messages=[{"role": "user", "content": "hi"}],
        )
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "temperature" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    image: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=stories_stack.model.name, max_tokens=8, messages=[{"role": "user", "content": [image]}]
        )
    # a well-formed image block reaches the styler, which refuses it for a text-only model
    assert "takes no images" in str(info.value)
    raw = httpx.post(stories_stack.url + "/v1/messages", json={"model": stories_stack.model.name}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_forced_tool_use_and_the_tool_result_loop(qwen3_stack: Stack) -> None:
    client = _client(qwen3_stack)
    model = qwen3_stack.model.name
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.messages.create(
        model=model,
        max_tokens=96,
        extra_body={"temperature": 0},
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=messages,
    )
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and len(uses) == 1
    assert uses[0].name == "get_weather" and set(uses[0].input) == {"city", "unit"}  # type: ignore[arg-type]

    # The SDK's loop: the assistant turn as returned, then the tool's result, then ask again.
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees, sunny"}],
        },
    ]
    again = client.messages.create(
        model=model,
        max_tokens=16,
        extra_body={"temperature": 0},
        tools=[WEATHER],
        messages=messages,  # type: ignore[list-item]
    )
    assert again.stop_reason in ("end_turn", "max_tokens", "tool_use")

    # streamed: the arguments arrive as input_json_delta pieces that parse to the same input
    with (
        client.messages.stream(
            model=model,
            max_tokens=96,
            extra_body={"temperature": 0},
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "any"},
            messages=messages[:1],
        ) as stream
    ):
        pieces = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]  # type: ignore[union-attr]
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed
    assert json.loads("".join(pieces)) == streamed[0].input


def test_api_key_from_x_api_key(stories_stack: Stack) -> None:
    with stories_stack.extra_gateway("gateway-api-key", ["--api-key", "sk-anthropic-test"]) as url:
        with pytest.raises(anthropic.AuthenticationError) as info:
            anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60).messages.create(
                model=stories_stack.model.name, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        ok = anthropic.Anthropic(base_url=url, api_key="sk-anthropic-test", max_retries=0).messages.create(
            model=stories_stack.model.name, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.usage.output_tokens >= 1


def _sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]  # the SSE event name is the payload's type
        events.append(data)
    return events


def test_bodies_and_events_validate_against_the_sdk_types(stories_stack: Stack, qwen3_stack: Stack) -> None:
    """Every body and stream event parses strictly (pydantic validation, not construct) into the
    official SDK's types, which Anthropic generates from its API specification."""
    from anthropic.types import Message, RawMessageStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(RawMessageStreamEvent)
    cases = [
        (stories_stack, {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16}),
        (
            qwen3_stack,
            {
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
                "max_tokens": 96,
                "tools": [WEATHER],
                "tool_choice": {"type": "any"},
            },
        ),
    ]
    for stack, body in cases:
        body = {"model": stack.model.name, "temperature": 0, **body}
        whole = httpx.post(stack.url + "/v1/messages", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        Message.model_validate(whole.json(), strict=False)
        streamed = httpx.post(stack.url + "/v1/messages", json={**body, "stream": True}, timeout=60)
        parsed = [events.validate_python(e) for e in _sse_events(streamed.text)]
        assert parsed[0].type == "message_start" and parsed[-1].type == "message_stop"
