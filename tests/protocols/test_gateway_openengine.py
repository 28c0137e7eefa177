"""tandem's gateway in front of a worker reached through OpenEngine (`--worker openengine:ADDR`)
or SMG's vllm_engine proto (`--worker smg:ADDR`) serves the openai client exactly as it does
through tandem's own proto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.config import GatewayConfig
from tests.e2e.stack import free_port
from tests.gateway.gateway_stack import Stack


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """styler + one worker + a gateway on tandem's proto; a second gateway reaches the same worker
    through OpenEngine (`stack.openengine_port`)."""
    if request.config.getoption("--target") is not None:
        pytest.skip("compares two gateways in front of a tandem worker of its own")
    stack = Stack(tmp_path_factory.mktemp("oe-stack"), stories_dir)
    try:
        stack.start()
        port = free_port()
        workers = [f"openengine:{a}" for a in stack.worker_addresses]
        stack.start_gateway("gateway-openengine", port, workers=workers)
        stack.wait_healthy(port, 120, all_workers=True)
        stack.openengine_port = port  # type: ignore[attr-defined]
        smg_port = free_port()
        stack.start_gateway("gateway-smg", smg_port, workers=[f"smg:{a}" for a in stack.worker_addresses])
        stack.wait_healthy(smg_port, 120, all_workers=True)
        stack.smg_port = smg_port  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def native(stack: Stack) -> openai.OpenAI:
    return client(stack.port)


@pytest.fixture(scope="module", params=["openengine", "smg"])
def via_openengine(stack: Stack, request: pytest.FixtureRequest) -> openai.OpenAI:
    """The gateway that reaches the worker through OpenEngine, then the one through SMG's proto."""
    return client(getattr(stack, f"{request.param}_port"))


def test_models_lists_the_engines_model(via_openengine: openai.OpenAI) -> None:
    assert [m.id for m in via_openengine.models.list().data] == ["stories260K"]


def test_completion_greedy_equals_tandems_proto(native: openai.OpenAI, via_openengine: openai.OpenAI) -> None:
    kwargs = dict(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=0.0)
    a = native.completions.create(**kwargs)  # type: ignore[call-overload]
    b = via_openengine.completions.create(**kwargs)  # type: ignore[call-overload]
    assert b.choices[0].text == a.choices[0].text and b.choices[0].text
    assert b.choices[0].finish_reason == a.choices[0].finish_reason
    assert b.usage is not None and a.usage is not None
    assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (
        a.usage.prompt_tokens,
        a.usage.completion_tokens,
    )


def test_chat_stream_with_stop_string_and_logprobs(
    native: openai.OpenAI, via_openengine: openai.OpenAI
) -> None:
    """Streaming, stop strings (the gateway's: it cancels the engine's stream) and logprobs."""
    kwargs = dict(
        model="stories260K",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=30,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
        stop=["."],
    )
    whole = native.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(via_openengine.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    streamed = [
        t.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content
    assert streamed == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content], abs=1e-4)


def test_n_choices_with_a_seed(via_openengine: openai.OpenAI) -> None:
    kwargs = dict(model="stories260K", prompt="Once", max_tokens=8, n=3, seed=11, temperature=1.0)
    a = via_openengine.completions.create(**kwargs)  # type: ignore[call-overload]
    b = via_openengine.completions.create(**kwargs)  # type: ignore[call-overload]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_guided_choice(via_openengine: openai.OpenAI) -> None:
    reply = via_openengine.chat.completions.create(
        model="stories260K",
        messages=[{"role": "user", "content": "yes or no?"}],
        max_tokens=10,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert reply.choices[0].message.content in ("yes", "no")


def test_openengine_is_refused_for_disaggregation() -> None:
    with pytest.raises(ValueError, match="an OpenEngine or SMG engine goes in --worker"):
        GatewayConfig(styler=["unix:/s"], worker=[], prefill_worker=["openengine:h:1"], decode_worker=["h:2"])
    with pytest.raises(ValueError, match="needs the engine's address"):
        GatewayConfig(styler=["unix:/s"], worker=["openengine:"])
