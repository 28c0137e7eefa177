"""OpenAI's own OpenAPI specification judges the OpenAI routes (issue 16).

Every response body and every streamed chunk of `/v1/chat/completions`, `/v1/completions` and
`/v1/models` is validated against the published schemas (tests/data/openai-openapi, loaded by
`openai_spec.py`): plain, streamed, n > 1, logprobs, tool-call, structured-output and reasoning
answers, over HTTP and through the official `openai` client. Requests the specification refuses
are answered with a 400 in OpenAI's error envelope (itself validated) naming the field.

Chat and completions run on the shared stories260K stack; tool calls, structured outputs and
reasoning on a tiny random Qwen3 (the real Qwen3 tokenizer, template and parsers), where the
forced tool choice and the bounded schemas make a random model produce calls and JSON.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import openai_spec as spec
import pytest
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

CHAT = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"
COMPLETION_CHUNK = "x-tandem-CompletionStreamChunk"  # CreateCompletionResponse, finish_reason nullable

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def whole(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed answer, validated against the route's response schema."""
    reply = _post(url, path, body)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    spec.check(CHAT if path.endswith("/chat/completions") else COMPLETION, answer)
    return answer


def streamed(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed answer's chunks, each validated against the route's chunk schema."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as reply:
        text = reply.read().decode()
    assert reply.status_code == 200, text
    assert reply.headers["content-type"].startswith("text/event-stream")
    chunks = spec.parse_sse(text)
    assert chunks
    for chunk in chunks:
        spec.check(CHAT_CHUNK if path.endswith("/chat/completions") else COMPLETION_CHUNK, chunk)
    return chunks


def _usage_last(chunks: list[dict[str, Any]]) -> None:
    """With include_usage: only the last chunk has usage, and no choices (OpenAI's contract)."""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


# ---- chat and completions on stories260K ------------------------------------------------------

CHAT_CASES: dict[str, dict[str, Any]] = {
    "plain": {"max_tokens": 6},
    "n>1": {"n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 7},
    "logprobs": {"logprobs": True, "top_logprobs": 3, "max_tokens": 4},
    "logprobs-n>1": {"logprobs": True, "top_logprobs": 0, "n": 2, "max_tokens": 3, "temperature": 1.0},
    "length": {"max_tokens": 1},
    "stop-string": {"stop": ["."], "max_tokens": 40},
    "max_completion_tokens": {"max_completion_tokens": 3, "temperature": 0.7, "top_p": 0.9},
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_answers_match_the_spec(stories_stack: Stack, case: str) -> None:
    body = {"model": stories_stack.model.name, "messages": MESSAGES, **CHAT_CASES[case]}
    answer = whole(stories_stack.url, "/v1/chat/completions", body)
    n = body.get("n", 1)
    assert [c["index"] for c in answer["choices"]] == list(range(n))
    for choice in answer["choices"]:
        message = choice["message"]
        assert isinstance(message["content"], str) and message["refusal"] is None
        assert "tool_calls" not in message  # OpenAI sends none without tools (issue 27)
        assert (choice["logprobs"] is None) == ("logprobs" not in body)

    chunks = streamed(
        stories_stack.url, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    _usage_last(chunks)
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert len(finishes) == n
    plain = streamed(stories_stack.url, "/v1/chat/completions", body)
    assert all("usage" not in c for c in plain)


COMPLETION_CASES: dict[str, dict[str, Any]] = {
    "plain": {"prompt": "Once upon a time", "max_tokens": 6},
    "n>1": {"prompt": "Once upon a time", "n": 2, "max_tokens": 4, "temperature": 1.0},
    "prompts": {"prompt": ["Once upon a time", "Lily"], "max_tokens": 3},
    "token-ids": {"prompt": [1, 400, 401], "max_tokens": 3},
    "logprobs": {"prompt": "Once upon a time", "logprobs": 2, "max_tokens": 4},
    "echo": {"prompt": "Once upon a time", "echo": True, "max_tokens": 3},
    "stop-string": {"prompt": "Once upon a time", "stop": "."},
}


@pytest.mark.parametrize("case", list(COMPLETION_CASES))
def test_completion_answers_match_the_spec(stories_stack: Stack, case: str) -> None:
    body = {"model": stories_stack.model.name, **COMPLETION_CASES[case]}
    answer = whole(stories_stack.url, "/v1/completions", body)
    if "logprobs" in body:
        assert all(len(c["logprobs"]["tokens"]) > 0 for c in answer["choices"])
    chunks = streamed(
        stories_stack.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    _usage_last(chunks)
    streamed(stories_stack.url, "/v1/completions", body)


def test_models_match_the_spec(stories_stack: Stack) -> None:
    listing = httpx.get(stories_stack.url + "/v1/models", timeout=30)
    assert listing.status_code == 200
    spec.check("ListModelsResponse", listing.json())
    model_id = listing.json()["data"][0]["id"]
    one = httpx.get(stories_stack.url + f"/v1/models/{model_id}", timeout=30)
    assert one.status_code == 200
    spec.check("Model", one.json())
    missing = httpx.get(stories_stack.url + "/v1/models/nope", timeout=30)
    assert missing.status_code == 404
    spec.check("ErrorResponse", missing.json())
    client = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    for model in client.models.list():
        spec.check("Model", model.model_dump(exclude_unset=True))


def test_continuous_usage_stats_put_usage_on_every_chunk(stories_stack: Stack) -> None:
    """vLLM's `stream_options.continuous_usage_stats` (guidellm always sends it, issue 27)."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "Once upon a time"}),
    ):
        chunks = streamed(
            stories_stack.url, path, {**body, "max_tokens": 5, "temperature": 0, "stream_options": options}
        )
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages), usages
        prompt_tokens = {u["prompt_tokens"] for u in usages}
        assert len(prompt_tokens) == 1 and prompt_tokens.pop() > 0
        completion = [u["completion_tokens"] for u in usages]
        assert completion == sorted(completion) and completion[-1] == 5
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
        assert chunks[-1]["choices"] == []  # the include_usage chunk still comes last
        # Without include_usage, the running usage is on every chunk and no usage chunk follows.
        running = streamed(
            stories_stack.url,
            path,
            {**body, "max_tokens": 5, "stream_options": {"continuous_usage_stats": True}},
        )
        assert all(c["usage"] is not None and c["choices"] for c in running)
        assert running[-1]["usage"]["completion_tokens"] == 5


def test_openai_client_objects_round_trip_to_the_spec(stories_stack: Stack) -> None:
    client = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    model = stories_stack.model.name
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, n=2, temperature=1.0, logprobs=True, top_logprobs=2
    )
    spec.check(CHAT, reply.model_dump(exclude_unset=True))
    for chunk in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    ):
        spec.check(CHAT_CHUNK, chunk.model_dump(exclude_unset=True))
    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, logprobs=1)
    spec.check(COMPLETION, completion.model_dump(exclude_unset=True))
    for piece in client.completions.create(model=model, prompt="Once", max_tokens=4, stream=True):
        spec.check(COMPLETION_CHUNK, piece.model_dump(exclude_unset=True))
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=2)
    spec.check(CHAT, raw.http_response.json())


# ---- requests the specification refuses -------------------------------------------------------

# (field the error must name, request fields) on top of a valid request. Each must be invalid under
# the specification's request schema (checked below) and a 400 from tandem.
BAD_CHAT: list[tuple[str, dict[str, Any]]] = [
    ("messages", {"messages": []}),
    ("messages", {"messages": "hello"}),
    ("messages[0].content", {"messages": [{"role": "user", "content": 5}]}),
    ("messages[0].role", {"messages": [{"content": "hi"}]}),
    ("model", {"model": 5}),
    ("temperature", {"temperature": 2.5}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": "hot"}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 0}),
    ("n", {"n": 129}),
    ("n", {"n": "2"}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": -1}),
    ("logprobs", {"logprobs": "yes"}),
    ("max_tokens", {"max_tokens": "ten"}),
    ("max_completion_tokens", {"max_completion_tokens": 1.5}),
    ("seed", {"seed": 2**64 - 1}),
    ("seed", {"seed": "1"}),
    ("stop", {"stop": 5}),
    ("stop", {"stop": ["a", 1]}),
    ("stream", {"stream": "yes"}),
    ("stream_options", {"stream": True, "stream_options": "usage"}),
    ("stream_options.include_usage", {"stream": True, "stream_options": {"include_usage": "yes"}}),
    ("tools", {"tools": "get_weather"}),
    ("tools[0].function.name", {"tools": [{"type": "function", "function": {"name": 5}}]}),
    ("tool_choice", {"tool_choice": "sometimes"}),
    ("parallel_tool_calls", {"parallel_tool_calls": "yes"}),
    ("response_format", {"response_format": {"type": "xml"}}),
    ("response_format", {"response_format": {"type": "json_schema"}}),
    ("user", {"user": 5}),
    ("logit_bias", {"logit_bias": {"50": "x"}}),
]
BAD_COMPLETION: list[tuple[str, dict[str, Any]]] = [
    ("prompt", {"prompt": 5}),
    ("prompt", {"prompt": [["a"]]}),
    ("max_tokens", {"max_tokens": -1}),
    ("max_tokens", {"max_tokens": "16"}),
    ("logprobs", {"logprobs": -1}),
    ("echo", {"echo": "yes"}),
    ("best_of", {"best_of": 21}),
    ("temperature", {"temperature": 2.1}),
    ("top_p", {"top_p": -0.5}),
    ("seed", {"seed": "x"}),
    ("suffix", {"suffix": 5}),
    ("n", {"n": 129}),
    ("stream_options.include_usage", {"stream": True, "stream_options": {"include_usage": 1}}),
]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{param}={json.dumps(fields)[:40]}" for param, fields in cases]


def _refused(url: str, path: str, request: dict[str, Any], param: str) -> None:
    reply = _post(url, path, request)
    assert reply.status_code == 400, (request, reply.status_code, reply.text)
    spec.check("ErrorResponse", reply.json())
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize(("param", "fields"), BAD_CHAT, ids=_ids(BAD_CHAT))
def test_chat_requests_the_spec_refuses_are_400(
    stories_stack: Stack, param: str, fields: dict[str, Any]
) -> None:
    request = {"model": stories_stack.model.name, "messages": MESSAGES, "max_tokens": 2, **fields}
    assert spec.errors("CreateChatCompletionRequest", request), "the specification accepts this request"
    _refused(stories_stack.url, "/v1/chat/completions", request, param)


@pytest.mark.parametrize(("param", "fields"), BAD_COMPLETION, ids=_ids(BAD_COMPLETION))
def test_completion_requests_the_spec_refuses_are_400(
    stories_stack: Stack, param: str, fields: dict[str, Any]
) -> None:
    request = {"model": stories_stack.model.name, "prompt": "Once", "max_tokens": 2, **fields}
    assert spec.errors("CreateCompletionRequest", request), "the specification accepts this request"
    _refused(stories_stack.url, "/v1/completions", request, param)


def test_the_valid_requests_here_are_valid_per_the_spec(stories_stack: Stack) -> None:
    """The cases above are requests OpenAI accepts (so the refusals test only what they change)."""
    model = stories_stack.model.name
    for fields in CHAT_CASES.values():
        spec.check("CreateChatCompletionRequest", {"model": model, "messages": MESSAGES, **fields})
    for fields in COMPLETION_CASES.values():
        spec.check("CreateCompletionRequest", {"model": model, **fields})


# ---- tool calls, structured outputs and reasoning on a tiny Qwen3 ------------------------------

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
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
# A template whose generation prompt opens a thought (as DeepSeek-R1's and QwQ's do): a random
# model then writes nothing but reasoning.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)

QWEN3_CASES: dict[str, dict[str, Any]] = {
    "tools-auto": {"tools": TOOLS, "max_tokens": 6},
    "tool-required": {
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 100,
    },
    "tool-required-n>1": {
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "n": 2,
        "max_tokens": 100,
        "temperature": 1.0,
        "seed": 4,
    },
    "tool-named": {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 60,
    },
    "tool-named-logprobs": {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 40,
    },
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        "max_tokens": 60,
    },
    "json_schema-n>1": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        "n": 2,
        "temperature": 1.0,
        "max_tokens": 60,
    },
    "reasoning": {"chat_template": THINKING_TEMPLATE, "max_tokens": 5},
    "reasoning-logprobs": {"chat_template": THINKING_TEMPLATE, "max_tokens": 3, "logprobs": True},
}


def _check_message(case: str, message: dict[str, Any], finish_reason: str) -> None:
    if case.startswith("tool-"):
        assert message["content"] is None and finish_reason in ("tool_calls", "stop")
        assert message["tool_calls"] and all(c["id"].startswith("call_") for c in message["tool_calls"])
        for call in message["tool_calls"]:
            json.loads(call["function"]["arguments"])
    elif case.startswith("json_schema"):
        person = json.loads(message["content"])
        assert set(person) == {"name", "age"}
        assert "tool_calls" not in message
    elif case.startswith("reasoning"):
        # All reasoning, no answer: OpenAI's content is null, not "" (issue 27).
        assert message["content"] is None and message["reasoning_content"]
        assert "tool_calls" not in message


@pytest.mark.parametrize("case", list(QWEN3_CASES))
def test_tool_call_structured_and_reasoning_answers_match_the_spec(qwen3_stack: Stack, case: str) -> None:
    body = {"model": qwen3_stack.model.name, "messages": MESSAGES, "temperature": 0, **QWEN3_CASES[case]}
    answer = whole(qwen3_stack.url, "/v1/chat/completions", body)
    for choice in answer["choices"]:
        _check_message(case, choice["message"], choice["finish_reason"])
    chunks = streamed(
        qwen3_stack.url, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    _usage_last(chunks)
    if case.startswith("tool-") and case != "tools-auto":
        calls = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls", [])]
        assert calls and all("index" in d for d in calls)

    client = openai.OpenAI(base_url=qwen3_stack.base_url, api_key="unused", max_retries=0, timeout=120)
    extra = {k: v for k, v in body.items() if k == "chat_template"}
    fields = {k: v for k, v in body.items() if k not in ("model", "messages", "chat_template")}
    reply = client.chat.completions.create(
        model=body["model"], messages=MESSAGES, extra_body=extra or None, **fields
    )
    spec.check(CHAT, reply.model_dump(exclude_unset=True))
    for chunk in client.chat.completions.create(
        model=body["model"], messages=MESSAGES, extra_body=extra or None, stream=True, **fields
    ):
        spec.check(CHAT_CHUNK, chunk.model_dump(exclude_unset=True))
