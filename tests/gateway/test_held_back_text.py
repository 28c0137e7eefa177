"""Tokens whose text the styler holds back still stream, through the real stack on stories260K.

`logit_bias` makes the model repeat the byte-fallback token of the lone UTF-8 lead byte 0xE4,
which never completes a character: no text until the finish (a U+FFFD per byte). As vLLM does,
the OpenAI streams send a chunk of empty text for those tokens, so a client sees its first token
when the worker makes it rather than when the request ends; the chunks still add up to the whole
answer, which is unchanged.
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

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
NUM_TOKENS = 6


def _lead_byte(stack: Stack) -> int:
    vocab = json.loads((stack.model / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    return int(vocab["<0xE4>"])


def _body(stack: Stack, path: str) -> dict[str, Any]:
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if path == CHAT else {"prompt": "Once"}
    return {
        **prompt,
        "max_tokens": NUM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logit_bias": {str(_lead_byte(stack)): 100},
    }


def _stream(stack: Stack, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.checked_stream(stack.url, path, body)


def test_held_back_text_streams_a_chunk_of_empty_text_per_token_batch(stories_stack: Stack) -> None:
    whole = httpx.post(stories_stack.url + COMPLETIONS, json=_body(stories_stack, COMPLETIONS), timeout=120)
    assert whole.status_code == 200, whole.text
    answer = whole.json()["choices"][0]
    assert answer["text"] == "\ufffd" * NUM_TOKENS and answer["finish_reason"] == "length"

    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _stream(
        stories_stack, COMPLETIONS, {**_body(stories_stack, COMPLETIONS), "stream_options": options}
    )
    *choices, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == NUM_TOKENS
    texts = [c["choices"][0]["text"] for c in choices]
    # Before the last token nothing is complete: each batch of tokens the worker sent (it may
    # merge steps) is a chunk of "" text; the last chunk releases the whole text.
    assert 1 <= len(texts) - 1 <= NUM_TOKENS - 1, texts
    assert texts[:-1] == [""] * (len(texts) - 1) and texts[-1] == answer["text"]
    assert [c["choices"][0]["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(n > 0 for n in completion) and completion == sorted(completion)


def test_the_openai_client_sees_held_back_tokens_as_empty_content(stories_stack: Stack) -> None:
    client = openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=60)
    body = _body(stories_stack, CHAT)
    kwargs: dict[str, Any] = {
        "model": stories_stack.model.name,
        "messages": body["messages"],
        "max_tokens": NUM_TOKENS,
        "temperature": 0,
        "logit_bias": body["logit_bias"],
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == "\ufffd" * NUM_TOKENS
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(**kwargs, stream=True)]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    contents = [d.content for d in deltas[1:]]
    assert 1 <= len(contents) - 1 <= NUM_TOKENS - 1, contents
    assert contents[:-1] == [""] * (len(contents) - 1) and contents[-1] == whole.choices[0].message.content
    for chunk in _stream(stories_stack, CHAT, body)[1:-1]:
        assert chunk["choices"][0]["delta"] == {"content": ""}
