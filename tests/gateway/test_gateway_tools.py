"""Tools and tool_choice on a tiny random Qwen3 (the real Qwen3 tokenizer and chat template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


@pytest.fixture(scope="module")
def reference(tiny_qwen3_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_dir))


def hf_ids(tok: Any, **kwargs: Any) -> list[int]:
    out = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_tools_reach_the_prompt_as_the_template_renders_them(qwen3_stack: Stack, reference: Any) -> None:
    want = hf_ids(reference, tools=TOOLS)
    got = httpx.post(
        qwen3_stack.url + "/tokenize", json={"messages": MESSAGES, "tools": TOOLS}, timeout=60
    ).json()
    assert got["tokens"] == want
    no_thinking = httpx.post(
        qwen3_stack.url + "/tokenize",
        json={"messages": MESSAGES, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}},
        timeout=60,
    ).json()
    assert no_thinking["tokens"] == hf_ids(reference, tools=TOOLS, enable_thinking=False)

    client = openai.OpenAI(base_url=qwen3_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    for tool_choice in ("auto", "none"):  # "none": tools are still rendered, only not parsed
        reply = client.chat.completions.create(
            model=qwen3_stack.model.name,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=8,
            temperature=0,
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == len(want)
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert isinstance(choice.message.tool_calls or [], list)
        dumped = reply.model_dump()
        assert set(dumped) >= {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
        assert set(dumped["choices"][0]["message"]) >= {"role", "content", "tool_calls"}
    without_tools = client.chat.completions.create(
        model=qwen3_stack.model.name,
        messages=MESSAGES,
        max_tokens=2,
        temperature=0,
    )
    assert without_tools.usage is not None and without_tools.usage.prompt_tokens == len(hf_ids(reference))


def test_streamed_tool_request_has_openai_chunk_shape(qwen3_stack: Stack) -> None:
    client = openai.OpenAI(base_url=qwen3_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=qwen3_stack.model.name,
        messages=MESSAGES,
        tools=TOOLS,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length", "tool_calls")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    for chunk in chunks:
        json.loads(chunk.model_dump_json())


def test_the_sdk_tool_loop_works_as_written(qwen3_stack: Stack) -> None:
    """The OpenAI SDK's canonical loop: append the reply's message object itself (assistant,
    `content: None`, `tool_calls` with JSON-text arguments) and a `tool` message, ask again."""
    client = openai.OpenAI(base_url=qwen3_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    messages: list[Any] = list(MESSAGES)
    reply = client.chat.completions.create(
        model=qwen3_stack.model.name,
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
    )
    message = reply.choices[0].message
    assert message.tool_calls and message.content is None  # the shape that used to fail
    messages.append(message)
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'})
    again = client.chat.completions.create(
        model=qwen3_stack.model.name, messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert again.usage is not None and again.usage.prompt_tokens > (
        reply.usage.prompt_tokens if reply.usage else 0
    )


def test_a_template_error_names_the_message_and_the_line(qwen3_stack: Stack) -> None:
    template = (
        "{% for m in messages %}\n{{ raise_exception('no ' + m.role) if m.role == 'tool' }}{% endfor %}"
    )
    body = {
        "messages": [*MESSAGES, {"role": "tool", "tool_call_id": "x", "content": "1"}],
        "chat_template": template,
        "max_tokens": 2,
    }
    reply = httpx.post(qwen3_stack.url + "/v1/chat/completions", json=body, timeout=60)
    error = reply.json()["error"]
    assert reply.status_code == 400, error
    assert error["param"] == "messages[2]"
    assert error["message"] == "messages[2]: no tool (chat template line 2)"


def test_a_continued_thought_is_reported_as_reasoning(qwen3_stack: Stack) -> None:
    """The prompt ends inside `<think>` without ending in `<think>`: the output is reasoning."""
    body = {
        "messages": [*MESSAGES, {"role": "assistant", "content": "<think>\nLet me think"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    reply = httpx.post(qwen3_stack.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message.get("reasoning_content"), message
    assert not message["content"], message
