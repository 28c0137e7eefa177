"""The gateway driven by the official `openai` client against the real stories260K stack."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(stories_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(stories_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(stories_dir))


def hf_greedy(hf: tuple[Any, Any], prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy continuation ids and their text as it reads after the prompt."""
    model, tok = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[1, 2],
            pad_token_id=0,
        )
    new = out[0, len(prompt_ids) :].tolist()
    while new and new[-1] in (1, 2):
        new.pop()
    full = tok.decode(prompt_ids + new, skip_special_tokens=True)
    return new, full[len(tok.decode(prompt_ids, skip_special_tokens=True)) :]


def post(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        stack.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as reply:
        return json.loads(reply.read())


def worker_greedy(stack: Stack, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The worker's own greedy output, over its gRPC API."""
    from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(stack.worker_addresses[0]) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(
            request_id="test-greedy",
            prompt_token_ids=prompt_ids,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        )
        ids: list[int] = []
        for chunk in stub.Generate(request, timeout=60):
            for choice in chunk.choices:
                ids.extend(choice.token_ids)
    while ids and ids[-1] in (1, 2):
        ids.pop()
    return ids


def test_completion_greedy_equals_worker_and_transformers(
    stories_stack: Stack, client: openai.OpenAI, hf: tuple[Any, Any]
) -> None:
    prompt_ids = hf[1](PROMPT)["input_ids"]
    ref_ids, ref_text = hf_greedy(hf, prompt_ids, 40)
    assert worker_greedy(stories_stack, prompt_ids, 40) == ref_ids
    reply = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == ref_text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)
    # the end token, when there is one, counts as generated
    assert reply.usage.completion_tokens in (len(ref_ids), len(ref_ids) + 1)
    # token-id prompts (a list of ids, and a list of id lists) give the same text
    by_ids = client.completions.create(model="stories260K", prompt=prompt_ids, max_tokens=40, temperature=0)
    assert by_ids.choices[0].text == ref_text
    two = client.completions.create(
        model="stories260K", prompt=[prompt_ids, prompt_ids[:3]], max_tokens=40, temperature=0
    )
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == ref_text
    assert two.choices[1].text == hf_greedy(hf, prompt_ids[:3], 40)[1]


def test_completion_stream_equals_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=30, temperature=0)
    stream = client.completions.create(
        model="stories260K",
        prompt=PROMPT,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_chat_greedy_stream_and_whole_equal_transformers(
    stories_stack: Stack, client: openai.OpenAI, hf: tuple[Any, Any]
) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    tokenized = post(stories_stack, "/tokenize", {"messages": messages})
    _, ref_text = hf_greedy(hf, tokenized["tokens"], 30)
    whole = client.chat.completions.create(
        model="stories260K", messages=messages, max_tokens=30, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == ref_text
    assert whole.system_fingerprint
    assert whole.usage is not None and whole.usage.prompt_tokens == len(tokenized["tokens"])
    assert whole.usage.prompt_tokens_details is not None
    assert whole.usage.prompt_tokens_details.cached_tokens is not None
    stream = client.chat.completions.create(
        model="stories260K",
        messages=messages,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref_text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_n_choices_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        reply = client.chat.completions.create(
            model="stories260K",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=20,
            temperature=1.0,
            n=3,
            seed=seed,
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage is not None
        return [c.message.content or "" for c in reply.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first + sample(99))) > 1  # sampling at temperature 1 is not constant


def test_stop_strings(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0
    ).choices[0]
    words = whole.text.split(" ")
    stop = " " + words[4]
    cut = whole.text[: whole.text.index(stop)]
    reply = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop]
    )
    assert reply.choices[0].text == cut
    assert reply.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        model="stories260K",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stop=stop,
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == cut + stop
    streamed = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_chat_logprobs_match_transformers(
    stories_stack: Stack, client: openai.OpenAI, hf: tuple[Any, Any]
) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(
        model="stories260K",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    prompt_ids = post(stories_stack, "/tokenize", {"messages": messages})["tokens"]
    ref_ids, _ = hf_greedy(hf, prompt_ids, 8)
    model, tok = hf
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ref_ids])).logits[0].float()
    ref_logprobs = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(content):
        position = len(prompt_ids) + i - 1
        assert math.isclose(entry.logprob, ref_logprobs[position, ref_ids[i]].item(), abs_tol=1e-3)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the top one
        assert entry.bytes == list(entry.token.encode())
        top_ids = torch.topk(ref_logprobs[position], 3).indices.tolist()
        assert [t.token for t in entry.top_logprobs] == [
            tok.convert_ids_to_tokens(t).replace("▁", " ") for t in top_ids
        ]


def test_completion_echo_and_logprobs(
    stories_stack: Stack, client: openai.OpenAI, hf: tuple[Any, Any]
) -> None:
    plain = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=10, temperature=0)
    echoed = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=10, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=10, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    lp = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2
    )
    logprobs = lp.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == lp.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(logprobs.tokens) == lp.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert all(len(alts) >= 2 for alts in logprobs.top_logprobs or [])
    # echo + logprobs: the prompt's tokens come back with their logprobs (the first has none).
    with_prompt = client.completions.create(
        model="stories260K", prompt=PROMPT, max_tokens=10, temperature=0, echo=True, logprobs=1
    )
    lp2 = with_prompt.choices[0].logprobs
    assert lp2 is not None and lp2.token_logprobs is not None and lp2.tokens is not None
    usage = with_prompt.usage
    assert usage is not None and len(lp2.token_logprobs) == usage.total_tokens
    assert lp2.token_logprobs[0] is None
    assert len(lp2.tokens) == len(lp2.token_logprobs)
    prompt_ids = post(stories_stack, "/tokenize", {"prompt": PROMPT})["tokens"]
    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    for position in range(1, len(prompt_ids)):
        want = reference[position - 1, prompt_ids[position]].item()
        assert math.isclose(lp2.token_logprobs[position], want, abs_tol=1e-3), position


def test_tokenize_with_chat_template_equals_transformers(
    stories_stack: Stack, shared_dir: Path, hf: tuple[Any, Any]
) -> None:
    _, tok = hf
    template = (shared_dir / "chat-templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    messages = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Tell me one about a cat."},
    ]
    got = post(stories_stack, "/tokenize", {"messages": messages, "chat_template": template})
    want = tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=True
    )
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert got["tokens"] == list(want)
    assert got["count"] == len(want) and got["max_model_len"] == 512
    plain = post(stories_stack, "/tokenize", {"prompt": PROMPT})
    assert plain["tokens"] == tok(PROMPT)["input_ids"]
    assert post(stories_stack, "/detokenize", {"tokens": plain["tokens"]})["prompt"] == PROMPT


def test_models_and_metrics(stories_stack: Stack, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["stories260K"]
    assert client.models.retrieve("stories260K").id == "stories260K"
    with urllib.request.urlopen(stories_stack.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for name in (
        'tandem:requests_total{finish_reason="length",route="/v1/completions",status="200"}',
        "tandem:time_to_first_token_seconds_bucket",
        "tandem:inter_token_latency_seconds_bucket",
        "tandem:e2e_request_latency_seconds_bucket",
        "tandem:prompt_tokens_total",
        "tandem:generation_tokens_total",
        "tandem:requests_running",
        "tandem:requests_waiting",
    ):
        assert name in text, name


def test_grpc_inference_api_matches_http(stories_stack: Stack, client: openai.OpenAI) -> None:
    from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    http = client.chat.completions.create(
        model="stories260K", messages=[{"role": "user", "content": PROMPT}], max_tokens=20, temperature=0
    )
    with grpc.insecure_channel(f"127.0.0.1:{stories_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", text=PROMPT)],
            options=inference_pb2.GenerationOptions(max_tokens=20, temperature=0.0),
        )
        reply = stub.ChatCompletion(request, timeout=60)
        assert reply.choices[0].message.content == http.choices[0].message.content
        assert reply.usage.total_tokens == http.usage.total_tokens  # type: ignore[union-attr]
        stream_request = inference_pb2.CompletionRequest(
            text=PROMPT,
            options=inference_pb2.GenerationOptions(max_tokens=20, temperature=0.0, include_usage=True),
        )
        chunks = list(stub.CompletionStream(stream_request, timeout=60))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == http.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 20
        assert [m.id for m in stub.ListModels(inference_pb2.ListModelsRequest()).models] == ["stories260K"]
        with pytest.raises(grpc.RpcError) as err:
            stub.ChatCompletion(
                inference_pb2.ChatCompletionRequest(
                    messages=[common_pb2.ChatMessage(role="user", text=PROMPT)],
                    options=inference_pb2.GenerationOptions(temperature=5.0),
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
