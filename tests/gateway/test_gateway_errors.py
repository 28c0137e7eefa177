"""Every error the gateway returns: its status, OpenAI's envelope, and a stack that still serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

CHAT = "/v1/chat/completions"
PNG_1X1 = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def http(stories_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stories_stack.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def guarded(stories_stack: Stack) -> Iterator[httpx.Client]:
    """A second gateway on the same styler and worker: two API keys, small bodies, no waiting room."""
    args = [
        "--api-key",
        "key-one",
        "--api-key",
        "key-two",
        "--max-request-bytes",
        "4096",
        "--max-waiting",
        "0",
    ]
    with (
        stories_stack.extra_gateway("gateway-guarded", args) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def workerless(stories_stack: Stack) -> Iterator[httpx.Client]:
    """A gateway whose only worker does not exist."""
    workers = [f"unix:{stories_stack.run_dir}/no-such-worker.sock"]
    with (
        stories_stack.extra_gateway("gateway-workerless", want=503, workers=workers) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def expect_error(
    reply: httpx.Response, status: int, param: str | None = None, words: str = ""
) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert "Traceback" not in reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if words:
        assert words in body["error"]["message"], body
    return body["error"]


def still_serves(http: httpx.Client) -> None:
    reply = http.post(COMPLETIONS, json={"prompt": "Once", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (CHAT, {"messages": MESSAGES, "temperature": 5}, "temperature", "<= 2"),
        (CHAT, {"messages": MESSAGES, "temperature": "hot"}, "temperature", "number"),
        (CHAT, {"messages": MESSAGES, "n": 0}, "n", ">= 1"),
        (CHAT, {"messages": []}, "messages", "non-empty"),
        (CHAT, {"messages": MESSAGES, "frobnicate": 1}, "frobnicate", "unknown"),
        (
            CHAT,
            {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        (CHAT, {"messages": MESSAGES, "suffix": "x"}, "suffix", "not supported yet"),
        (CHAT, {"messages": MESSAGES, "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        (CHAT, {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs", "logprobs"),
        (CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
            "data: URL or an http(s) URL",
        ),
        (  # a valid image for a text-only model: the styler refuses it
            CHAT,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_1X1}}]}
                ]
            },
            "messages",
            "takes no images",
        ),
        (
            CHAT,
            {
                "messages": MESSAGES,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            "not in 'tools'",
        ),
        (CHAT, {"messages": MESSAGES, "max_tokens": 100000}, "max_tokens", "context length"),
        (COMPLETIONS, {"prompt": "x" * 3000}, None, "context length"),
        (COMPLETIONS, {"prompt": [[]]}, "prompt", "prompt"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 50}, "logprobs", "<= 20"),
        (COMPLETIONS, {}, "prompt", "required"),
        (CHAT, {"messages": MESSAGES, "chat_template": "{% for %}"}, "chat_template", "syntax error"),
    ],
)
def test_invalid_input_is_400_naming_the_field(
    http: httpx.Client, path: str, body: dict[str, Any], param: str | None, words: str
) -> None:
    expect_error(http.post(path, json=body), 400, param, words)
    still_serves(http)


def test_malformed_bodies_are_400(http: httpx.Client) -> None:
    expect_error(http.post(CHAT, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    expect_error(http.post(CHAT, content=json.dumps([1, 2])), 400, words="JSON object")
    expect_error(http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES}), 400)
    still_serves(http)


def test_unknown_model_and_route_are_404(http: httpx.Client) -> None:
    error = expect_error(http.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES}), 404, "model")
    assert error["code"] == "model_not_found"
    expect_error(http.post(COMPLETIONS, json={"model": "gpt-9", "prompt": "x"}), 404, "model")
    expect_error(http.get("/v1/models/gpt-9"), 404)
    expect_error(http.get("/v1/nothing-here"), 404)
    expect_error(http.get(CHAT), 405)
    still_serves(http)


def test_api_keys(guarded: httpx.Client, http: httpx.Client) -> None:
    expect_error(guarded.get("/v1/models"), 401)
    expect_error(guarded.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    expect_error(
        guarded.post(CHAT, json={"messages": MESSAGES}, headers={"Authorization": "Basic key-one"}), 401
    )
    for key in ("key-one", "key-two"):
        reply = guarded.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
    assert guarded.get("/health").status_code == 200  # probes need no key
    still_serves(http)


def test_body_over_limit_is_413(guarded: httpx.Client, http: httpx.Client) -> None:
    body = {"prompt": "x" * 10_000}
    expect_error(guarded.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer key-one"}), 413)
    still_serves(http)


def test_full_waiting_queue_is_429_with_retry_after(guarded: httpx.Client, http: httpx.Client) -> None:
    reply = guarded.post(COMPLETIONS, json={"prompt": "Once"}, headers={"Authorization": "Bearer key-two"})
    expect_error(reply, 429)
    assert int(reply.headers["Retry-After"]) >= 1
    still_serves(http)


def test_no_worker_is_503_with_retry_after(workerless: httpx.Client, http: httpx.Client) -> None:
    for stream in (False, True):
        reply = workerless.post(COMPLETIONS, json={"prompt": "Once", "stream": stream})
        expect_error(reply, 503)
        assert int(reply.headers["Retry-After"]) >= 1
    health = workerless.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    # the styler-only routes still work without a worker
    assert workerless.post("/tokenize", json={"prompt": "Once"}).status_code == 200
    still_serves(http)
