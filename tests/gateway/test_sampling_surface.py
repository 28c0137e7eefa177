"""The rest of the chat / completions sampling surface (issue 24) through the real stack on
stories260K: `logit_bias`, vLLM's `prompt_logprobs` (against transformers' log_softmax) and 20
top logprobs in every mode, over HTTP and the public gRPC API. Every body is checked against
OpenAI's published schema as well.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai_spec as spec
import pytest
import torch
from gateway_stack import Stack

from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = [pytest.mark.e2e]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]
PROMPT_IDS = [1, 403, 407, 261, 378, 275, 290, 300, 311, 403, 407, 261]  # a repeat: not a cache hit


def _post(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack.url + path, json=body, timeout=120)


def _ok(stack: Stack, path: str, body: dict[str, Any], schema: bool = True) -> dict[str, Any]:
    """The 200 answer, valid under OpenAI's schema (`schema=False`: echo's null first logprob,
    as vLLM sends it, which the schema has no room for)."""
    reply = _post(stack, path, body)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    if schema:
        spec.check("CreateChatCompletionResponse" if path == CHAT else "CreateCompletionResponse", answer)
    return answer


def _stream(stack: Stack, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.checked_stream(stack.url, path, body)


def _refused(stack: Stack, path: str, body: dict[str, Any], param: str, words: str) -> None:
    reply = _post(stack, path, body)
    assert reply.status_code == 400, (body, reply.text)
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


@cache
def _hf(model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def _reference(model: Path, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of transformers' logits at each prompt position."""
    with torch.no_grad():
        return torch.log_softmax(_hf(model)(torch.tensor([ids])).logits[0].float(), dim=-1)


def _tokenize(stack: Stack, body: dict[str, Any]) -> list[int]:
    reply = _post(stack, "/tokenize", body)
    assert reply.status_code == 200, reply.text
    return list(reply.json()["tokens"])


def _detokenize(stack: Stack, ids: list[int]) -> str:
    reply = _post(stack, "/detokenize", {"tokens": ids})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["prompt"])


# ---- logit_bias --------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_over_http_and_grpc(stories_stack: Stack) -> None:
    forced = _tokenize(stories_stack, {"prompt": " dog", "add_special_tokens": False})[-1]
    want = _detokenize(stories_stack, [forced] * 5)
    for path, body in ((CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": "Once upon a time"})):
        for temperature in (0.0, 1.0):
            answer = _ok(
                stories_stack,
                path,
                {
                    **body,
                    "max_tokens": 5,
                    "temperature": temperature,
                    "seed": 3,
                    "logit_bias": {str(forced): 100},
                },
            )
            choice = answer["choices"][0]
            text = choice["message"]["content"] if path == CHAT else choice["text"]
            assert text == want and answer["usage"]["completion_tokens"] == 5, answer
    # -100 bans: the greedy first token is never chosen again
    plain = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    first = _ok(stories_stack, COMPLETIONS, plain)["choices"][0]["logprobs"]
    banned_text = first["tokens"][0]
    banned_id = _tokenize(
        stories_stack, {"prompt": "Once upon a time" + banned_text, "add_special_tokens": False}
    )[-1]
    assert _detokenize(stories_stack, [banned_id]).strip() == banned_text.strip()
    again = _ok(stories_stack, COMPLETIONS, {**plain, "logit_bias": {str(banned_id): -100}})["choices"][0]
    assert again["logprobs"]["tokens"][0] != banned_text
    # the second most likely token takes its place (logprobs are the unbiased model's)
    alternatives = first["top_logprobs"][0]
    assert (
        again["logprobs"]["tokens"][0]
        in _ok(stories_stack, COMPLETIONS, {**plain, "logprobs": 2})["choices"][0]["logprobs"][
            "top_logprobs"
        ][0]
    )
    assert banned_text in alternatives
    # the public gRPC API carries it too: the same text as over HTTP
    http = _ok(
        stories_stack,
        CHAT,
        {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "logit_bias": {str(forced): 50}},
    )
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(max_tokens=5, temperature=0.0, logit_bias={forced: 50.0})
        reply = stub.ChatCompletion(
            inference_pb2.ChatCompletionRequest(
                messages=[common_pb2.ChatMessage(role="user", text=MESSAGES[0]["content"])], options=options
            ),
            timeout=60,
        )
        assert reply.choices[0].message.content == http["choices"][0]["message"]["content"] == want
        with pytest.raises(grpc.RpcError) as err:
            stub.Completion(
                inference_pb2.CompletionRequest(
                    text="Once", options=inference_pb2.GenerationOptions(logit_bias={600: 1.0})
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in (
            err.value.details() or ""
        )


def test_logit_bias_errors_name_the_field(stories_stack: Stack) -> None:
    for path, body in ((CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": "Once"})):
        for bias, words in (
            ({"dog": 1}, "token ids"),
            ({"5": 101}, "[-100, 100]"),
            ({"5": "high"}, "numbers"),
            ({"600": 1}, "vocabulary size 512"),  # stories260K's vocabulary
            ({str(t): 1 for t in range(301)}, "at most 300"),
        ):
            _refused(stories_stack, path, {**body, "logit_bias": bias}, "logit_bias", words)


# ---- prompt_logprobs (vLLM) --------------------------------------------------------------------


def _check_prompt_logprobs(entries: list[Any], ids: list[int], ref: torch.Tensor, k: int) -> None:
    """vLLM's shape: null, then per token {id: {logprob, rank, decoded_token}} with the prompt's
    token and the k most likely; values are transformers' within 1e-4."""
    assert len(entries) == len(ids) and entries[0] is None
    for j, entry in enumerate(entries[1:], start=1):
        row = ref[j - 1]
        own = entry[str(ids[j])]
        assert own["logprob"] == pytest.approx(row[ids[j]].item(), abs=1e-4)
        assert own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        top = row.topk(k)
        for rank, (token, value) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), 1):
            if token == ids[j]:
                continue
            assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-4)
            assert entry[str(token)]["rank"] == rank
        assert len(entry) in (k, k + 1)


def test_prompt_logprobs_match_transformers(stories_stack: Stack) -> None:
    ref = _reference(stories_stack.model, PROMPT_IDS)
    body = {"prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3, "n": 2}
    first = _ok(stories_stack, COMPLETIONS, body)
    for choice in first["choices"]:
        _check_prompt_logprobs(choice["prompt_logprobs"], PROMPT_IDS, ref, 3)
    # the same prompt again would be a prefix-cache hit: the worker computes it instead
    second = _ok(stories_stack, COMPLETIONS, body)
    assert second["choices"][0]["prompt_logprobs"] == first["choices"][0]["prompt_logprobs"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # 20 alternatives, and echo's logprobs keep their own count
    echo = _ok(
        stories_stack,
        COMPLETIONS,
        {**body, "n": 1, "prompt_logprobs": 20, "echo": True, "logprobs": 1},
        schema=False,
    )
    (choice,) = echo["choices"]
    _check_prompt_logprobs(choice["prompt_logprobs"], PROMPT_IDS, ref, 20)
    tops = choice["logprobs"]["top_logprobs"]
    assert tops[0] is None and all(len(t) <= 2 for t in tops[1:])
    # 0: the prompt token's own logprob only; absent: no key
    zero = _ok(stories_stack, COMPLETIONS, {**body, "prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
    assert all(len(e) == 1 for e in zero[1:])
    assert (
        "prompt_logprobs"
        not in _ok(stories_stack, COMPLETIONS, {**body, "prompt_logprobs": None})["choices"][0]
    )
    # chat: at the response's top level, for the rendered prompt
    chat = _ok(
        stories_stack, CHAT, {"messages": MESSAGES, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    )
    ids = _tokenize(stories_stack, {"messages": MESSAGES})
    assert len(ids) == chat["usage"]["prompt_tokens"]
    _check_prompt_logprobs(chat["prompt_logprobs"], ids, _reference(stories_stack.model, ids), 2)
    assert "prompt_logprobs" not in chat["choices"][0]
    for path, base in ((CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": "Once"})):
        _refused(
            stories_stack, path, {**base, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"
        )
        _refused(stories_stack, path, {**base, "prompt_logprobs": 21}, "prompt_logprobs", "<= 20")


# ---- 20 top logprobs in every mode -------------------------------------------------------------


def _chat_tops(entries: list[dict[str, Any]]) -> list[int]:
    return [len(e["top_logprobs"]) for e in entries]


def test_twenty_top_logprobs_in_every_mode(stories_stack: Stack) -> None:
    chat = {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 20, "seed": 1}
    whole = _ok(stories_stack, CHAT, {**chat, "n": 2})
    for choice in whole["choices"]:
        assert _chat_tops(choice["logprobs"]["content"]) == [20] * 4
    chunks = _stream(stories_stack, CHAT, {**chat, "n": 2})
    per_choice: dict[int, list[int]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["logprobs"]:
                per_choice.setdefault(c["index"], []).extend(_chat_tops(c["logprobs"]["content"]))
    assert per_choice == {0: [20] * 4, 1: [20] * 4}
    # guided: alternatives are the tokens the constraint allows (a regex allowing many)
    guided = _ok(stories_stack, CHAT, {**chat, "guided_regex": "[a-z ]{8,40}"})
    assert _chat_tops(guided["choices"][0]["logprobs"]["content"]) == [20] * 4
    # completions: `logprobs` up to 20 (vLLM's limit; OpenAI's is 5), whole and streamed
    completion = {"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 20, "seed": 1, "n": 2}
    for choice in _ok(stories_stack, COMPLETIONS, completion)["choices"]:
        # keyed by token text: distinct ids of the same text would share a key
        assert all(18 <= len(t) <= 21 for t in choice["logprobs"]["top_logprobs"]), choice
    streamed = [
        len(t)
        for chunk in _stream(stories_stack, COMPLETIONS, completion)
        for c in chunk["choices"]
        if c["logprobs"]
        for t in c["logprobs"]["top_logprobs"]
    ]
    assert len(streamed) == 8 and all(18 <= n <= 21 for n in streamed)
    _refused(stories_stack, CHAT, {**chat, "top_logprobs": 21}, "top_logprobs", "<= 20")
    _refused(stories_stack, COMPLETIONS, {**completion, "logprobs": 21}, "logprobs", "<= 20")
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(max_tokens=3, n=2, seed=1)
        request = inference_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", text=MESSAGES[0]["content"])],
            options=options,
            logprobs=True,
            top_logprobs=20,
        )
        reply = stub.ChatCompletion(request, timeout=60)
        assert [[len(e.top_logprobs) for e in c.logprobs] for c in reply.choices] == [[20] * 3] * 2
        streamed_grpc = [
            len(e.top_logprobs)
            for chunk in stub.ChatCompletionStream(request, timeout=60)
            for c in chunk.choices
            for e in c.logprobs
        ]
        assert streamed_grpc == [20] * 6
        text = stub.Completion(
            inference_pb2.CompletionRequest(text="Once", options=options, logprobs=20), timeout=60
        )
        for c in text.choices:
            assert all(18 <= len(t.alternatives) <= 21 for t in c.logprobs.top_logprobs)


# ---- stream_options.continuous_usage_stats over gRPC (HTTP: test_openai_schema.py) -------------


def test_continuous_usage_stats_over_grpc(stories_stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(max_tokens=5, temperature=0.0, continuous_usage_stats=True)
        chunks = list(
            stub.CompletionStream(inference_pb2.CompletionRequest(text="Once", options=options), timeout=60)
        )
        assert chunks and all(c.HasField("usage") and c.choices for c in chunks)
        completion = [c.usage.completion_tokens for c in chunks]
        assert completion == sorted(completion) and completion[-1] == 5
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
        with pytest.raises(grpc.RpcError) as err:
            stub.Completion(inference_pb2.CompletionRequest(text="Once", options=options), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "continuous_usage_stats" in (err.value.details() or "")


def test_prompt_logprobs_over_grpc_equal_http(stories_stack: Stack) -> None:
    body = {"prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    http = _ok(stories_stack, COMPLETIONS, body)["choices"][0]["prompt_logprobs"]
    chat_http = _ok(stories_stack, CHAT, {"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 1})

    def as_json(entries: Any) -> list[dict[str, Any] | None]:
        return [
            {
                str(c.token_id): {"logprob": c.logprob, "rank": c.rank, "decoded_token": c.decoded_token}
                for c in e.candidates
            }
            or None
            for e in entries
        ]

    def close(got: list[dict[str, Any] | None], want: list[dict[str, Any] | None]) -> None:
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None and w is not None:
                assert g.keys() == w.keys()
                for t in g:  # float32 on the wire
                    assert g[t]["logprob"] == pytest.approx(w[t]["logprob"], abs=1e-5)
                    assert (g[t]["rank"], g[t]["decoded_token"]) == (w[t]["rank"], w[t]["decoded_token"])

    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        options = inference_pb2.GenerationOptions(max_tokens=2, temperature=0.0, prompt_logprobs=3)
        reply = stub.Completion(
            inference_pb2.CompletionRequest(
                token_ids=inference_pb2.TokenIds(ids=PROMPT_IDS), options=options
            ),
            timeout=60,
        )
        close(as_json(reply.choices[0].prompt_logprobs), http)
        chat = stub.ChatCompletion(
            inference_pb2.ChatCompletionRequest(
                messages=[common_pb2.ChatMessage(role="user", text=MESSAGES[0]["content"])],
                options=inference_pb2.GenerationOptions(max_tokens=2, prompt_logprobs=1),
            ),
            timeout=60,
        )
        close(as_json(chat.prompt_logprobs), chat_http["prompt_logprobs"])
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.CompletionStream(
                    inference_pb2.CompletionRequest(text="Once", options=options), timeout=60
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_logprobs" in (err.value.details() or "")
