"""OpenAI's Responses API through the real stack, driven by the official `openai` SDK.

stories260K for text (greedy output equals the chat route's), a tiny random Qwen3 (its real
tokenizer and template) for function tools; stored responses in a SQLite file that survives a
gateway restart, expire after the TTL, and stay readable after a kill -9 mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_stack import Stack

from gateway.response_store import ResponseStore, StoredResponse

pytestmark = [pytest.mark.e2e]

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stack(stories_stack: Stack) -> Stack:
    return stories_stack  # its gateway stores Responses (--responses-db in its run directory)


def test_create_equals_the_chat_route(stack: Stack) -> None:
    client = _client(stack)
    response = client.responses.create(
        model=stack.model.name,
        instructions="You tell stories.",
        input="Once upon a time",
        max_output_tokens=24,
        temperature=0,
    )
    chat = client.chat.completions.create(
        model=stack.model.name,
        max_tokens=24,
        temperature=0,
        messages=[
            {"role": "system", "content": "You tell stories."},
            {"role": "user", "content": "Once upon a time"},
        ],
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert [item.type for item in response.output] == ["message"]
    incomplete = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if incomplete else "completed")
    assert chat.usage is not None and response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_stream_events_add_up_to_the_response(stack: Stack) -> None:
    client = _client(stack)
    kwargs: dict[str, Any] = {
        "model": stack.model.name,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Once upon a time"}]}],
        "max_output_tokens": 32,
        "temperature": 0,
        "store": False,
    }
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    # OpenAI ends a response cut by max_output_tokens with `response.incomplete`, else `completed`
    assert types[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta"):
        assert kind in types
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_store_retrieve_continue_and_delete(stack: Stack) -> None:
    client = _client(stack)
    first = client.responses.create(
        model=stack.model.name, input="Once upon a time", max_output_tokens=16, temperature=0
    )
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = client.responses.input_items.list(first.id)
    assert items.data[0].type == "message"

    # previous_response_id continues the conversation: the prompt holds the first turn and its answer
    second = client.responses.create(
        model=stack.model.name,
        previous_response_id=first.id,
        input="And then?",
        max_output_tokens=8,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    messages = [
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    tokens = httpx.post(stack.url + "/tokenize", json={"messages": messages}, timeout=30).json()
    assert second.usage is not None and second.usage.input_tokens == tokens["count"]

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=stack.model.name, previous_response_id=first.id, input="x", max_output_tokens=4
        )


def test_refusals_name_the_field(stack: Stack) -> None:
    client = _client(stack)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"background": True}, "background"),
        ({"temperature": 9}, "temperature"),
        ({"max_output_tokens": -1}, "max_output_tokens"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input[0].content[0]",
        ),
    ]
    for extra, param in cases:
        kwargs = {"model": stack.model.name, "input": "hi", "max_output_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(**kwargs)
        body = info.value.body
        assert isinstance(body, dict) and body.get("param") == param, (extra, body)
    # a well-formed image reaches the styler, which refuses it for a text-only model
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=stack.model.name, input=[{"role": "user", "content": [image]}], max_output_tokens=4
        )
    assert "takes no images" in str(info.value) and info.value.body["param"] == "input"  # type: ignore[index]


def test_function_calls_and_their_outputs(qwen3_stack: Stack) -> None:
    client = _client(qwen3_stack)
    model = qwen3_stack.model.name
    response = client.responses.create(
        model=model,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=96,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city", "unit"}

    # the SDK's loop: the call and its output as input items of the next turn
    follow = client.responses.create(
        model=model,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees, sunny"}],
        tools=[WEATHER],
        max_output_tokens=8,
        temperature=0,
    )
    assert follow.status in ("completed", "incomplete")

    with client.responses.stream(
        model=model,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=96,
        temperature=0,
        store=False,
    ) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    streamed = [item for item in final.output if item.type == "function_call"]
    assert streamed and "".join(deltas) == streamed[0].arguments


def test_stored_responses_survive_a_gateway_restart(stories_stack: Stack, tmp_path: Path) -> None:
    """A gateway of its own (its own database) on the shared stack, stopped and started again."""
    args = ["--responses-db", str(tmp_path / "responses.sqlite3"), "--responses-ttl", "3600"]
    with stories_stack.extra_gateway("gateway-responses", args) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kept = client.responses.create(
            model=stories_stack.model.name, input="Once upon a time", max_output_tokens=8
        )
    with stories_stack.extra_gateway("gateway-responses", args, port=int(url.rsplit(":", 1)[1])) as again:
        assert again == url
        assert client.responses.retrieve(kept.id).output_text == kept.output_text


def test_expired_responses_are_gone(tmp_path: Path) -> None:
    import asyncio

    async def run() -> None:
        store = ResponseStore(str(tmp_path / "r.sqlite3"), ttl_s=-1.0)  # every row is born expired
        await store.open()
        await store.put(StoredResponse("resp_x", [], [], {"id": "resp_x"}))
        assert await store.get("resp_x") is None
        assert not await store.delete("resp_x")
        await store.close()

    asyncio.run(run())


def test_a_kill_mid_write_leaves_a_readable_database(tmp_path: Path) -> None:
    """A process writing responses in a loop is killed with SIGKILL; the file still opens and
    every row it reports committed is there (WAL)."""
    db = tmp_path / "r.sqlite3"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from gateway.response_store import ResponseStore, StoredResponse\n"
            "async def main():\n"
            f"    store = ResponseStore({str(db)!r}, 3600)\n"
            "    await store.open()\n"
            "    i = 0\n"
            "    while True:\n"
            "        await store.put(StoredResponse(f'resp_{i}', [{'role': 'user', 'content': 'x' * 4096}], [], {'id': i}))\n"
            "        print(i, flush=True)\n"
            "        i += 1\n"
            "asyncio.run(main())\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert writer.stdout is not None
    committed = -1
    for line in writer.stdout:
        committed = int(line)
        if committed >= 200:
            break
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in conn.execute("SELECT id FROM responses")}
    assert {f"resp_{i}" for i in range(committed + 1)} <= ids


def test_bodies_and_events_validate_against_the_sdk_types(stack: Stack, qwen3_stack: Stack) -> None:
    """Every Response and stream event parses strictly (pydantic validation) into the official SDK's
    types, which OpenAI generates from its published OpenAPI specification."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(ResponseStreamEvent)
    cases: list[tuple[Stack, dict[str, Any]]] = [
        (stack, {"input": "Once upon a time", "max_output_tokens": 16}),
        (
            qwen3_stack,
            {
                "input": "Weather in Paris?",
                "max_output_tokens": 96,
                "tools": [WEATHER],
                "tool_choice": "required",
            },
        ),
    ]
    for target, body in cases:
        body = {"model": target.model.name, "temperature": 0, "store": False, **body}
        whole = httpx.post(target.base_url + "/responses", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        Response.model_validate(whole.json())
        streamed = httpx.post(target.base_url + "/responses", json={**body, "stream": True}, timeout=60)
        parsed = []
        for block in streamed.text.strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            parsed.append(events.validate_python(json.loads(lines["data"])))
            assert lines["event"] == parsed[-1].type
        assert parsed[0].type == "response.created"
