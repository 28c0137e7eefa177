"""Beam search and best_of through the gateway (the openai client's extra_body, and the public
gRPC API) on the real stories260K stack: the same output as transformers' beam search; the
combinations that are not supported are 400s naming the field."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
from gateway_stack import Stack

from services.worker.model_config import load_model_config

pytestmark = [pytest.mark.e2e]

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(stories_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(stories_dir: Path) -> tuple[Any, Any, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    eos = list(load_model_config(str(stories_dir)).eos_token_ids)
    return model, AutoTokenizer.from_pretrained(str(stories_dir)), eos


def post(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        stack.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def hf_beam_texts(hf: tuple[Any, Any, list[int]], prompt_ids: list[int], **kw: Any) -> list[str]:
    """transformers' beam search, each returned hypothesis as text after the prompt."""
    model, tok, eos = hf
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            generation_config=gc,
        )
    texts = []
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    for row in out:
        new = row[len(prompt_ids) :].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), len(new))
        texts.append(tok.decode(prompt_ids + new[:end], skip_special_tokens=True)[len(head) :])
    return texts


@pytest.mark.parametrize(
    ("n", "best_of", "length_penalty", "early_stopping"),
    [(2, 4, 1.0, False), (3, 3, 0.0, "never"), (1, 3, 2.0, True)],
)
def test_completion_beam_search_equals_transformers(
    stories_stack: Stack,
    client: openai.OpenAI,
    hf: tuple[Any, Any, list[int]],
    n: int,
    best_of: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> None:
    prompt_ids = post(stories_stack, "/tokenize", {"prompt": PROMPT})[1]["tokens"]
    reply = client.completions.create(
        model="stories260K",
        prompt=PROMPT,
        max_tokens=24,
        n=n,
        extra_body={
            "use_beam_search": True,
            "best_of": best_of,
            "length_penalty": length_penalty,
            "early_stopping": early_stopping,
        },
    )
    expected = hf_beam_texts(
        hf,
        prompt_ids,
        num_beams=best_of,
        num_return_sequences=n,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=24,
    )
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt_ids)  # the prompt once


def test_chat_beam_search_equals_transformers(
    stories_stack: Stack, client: openai.OpenAI, hf: tuple[Any, Any, list[int]]
) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = post(stories_stack, "/tokenize", {"messages": messages})[1]["tokens"]
    reply = client.chat.completions.create(
        model="stories260K",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=20,
        n=2,
        extra_body={"use_beam_search": True, "best_of": 3},
    )
    expected = hf_beam_texts(hf, prompt_ids, num_beams=3, num_return_sequences=2, max_new_tokens=20)
    assert [c.message.content for c in reply.choices] == expected


def test_grpc_beam_search_matches_http(stories_stack: Stack, client: openai.OpenAI) -> None:
    from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    http = client.completions.create(
        model="stories260K",
        prompt=PROMPT,
        max_tokens=16,
        n=2,
        extra_body={"use_beam_search": True, "best_of": 3, "early_stopping": "never", "length_penalty": 0.5},
    )
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(
            max_tokens=16,
            n=2,
            best_of=3,
            use_beam_search=True,
            length_penalty=0.5,
            early_stopping=common_pb2.EARLY_STOPPING_NEVER,
        )
        reply = stub.Completion(inference_pb2.CompletionRequest(text=PROMPT, options=options), timeout=60)
        assert [c.text for c in reply.choices] == [c.text for c in http.choices]
        with pytest.raises(grpc.RpcError) as err:
            stub.Completion(
                inference_pb2.CompletionRequest(
                    text=PROMPT,
                    options=inference_pb2.GenerationOptions(use_beam_search=True, temperature=0.5),
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()


def test_best_of_returns_the_most_likely_of_its_candidates(client: openai.OpenAI) -> None:
    """best_of=4, n=2, seeded: the two returned are the two most likely (summed token logprobs)
    of the four choices the same seed samples with n=4, most likely first."""
    common: dict[str, Any] = {
        "model": "stories260K",
        "prompt": PROMPT,
        "max_tokens": 12,
        "seed": 11,
        "temperature": 1.0,
    }
    four = client.completions.create(n=4, logprobs=0, **common)
    totals = []
    for c in four.choices:
        assert c.logprobs is not None and c.logprobs.token_logprobs is not None
        totals.append((sum(c.logprobs.token_logprobs), c.index, c.text))
    ranked = [text for _, _, text in sorted(totals, key=lambda t: (-t[0], t[1]))]
    best = client.completions.create(n=2, extra_body={"best_of": 4}, **common)
    assert [c.text for c in best.choices] == ranked[:2]
    assert best.usage is not None and best.usage.prompt_tokens == four.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(math.isfinite(t) for t, _, _ in totals)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"use_beam_search": True, "stream": True}, "stream"),
        ({"best_of": 3, "n": 1, "stream": True}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"use_beam_search": True, "temperature": 0.8}, "temperature"),
        ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
        ({"use_beam_search": True, "top_k": 3}, "top_k"),
        ({"use_beam_search": True, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"use_beam_search": True, "guided_regex": "a+"}, "guided_regex"),
        ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format"),
        ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
        ({"length_penalty": 0.5}, "length_penalty"),
        ({"early_stopping": True}, "early_stopping"),
    ],
)
def test_unsupported_combinations_are_400s_naming_the_field(
    stories_stack: Stack, body: dict[str, Any], param: str
) -> None:
    for path, base in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
    ):
        if param == "response_format" and path == "/v1/completions":
            continue  # (completions take guided_* only... and response_format as vLLM does)
        status, reply = post(stories_stack, path, {"model": "stories260K", "max_tokens": 4, **base, **body})
        assert status == 400, (path, reply)
        assert reply["error"]["param"] == param, (path, reply)


def test_beam_search_with_forced_tool_choice_is_refused(stories_stack: Stack) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    status, reply = post(
        stories_stack,
        "/v1/chat/completions",
        {
            "model": "stories260K",
            "messages": [{"role": "user", "content": PROMPT}],
            "tools": [tool],
            "tool_choice": "required",
            "use_beam_search": True,
        },
    )
    assert status == 400 and reply["error"]["param"] == "tool_choice", reply
