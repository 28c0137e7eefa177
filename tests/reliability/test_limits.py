"""Every configurable request limit is a clear 400 naming the field; admission by queued tokens
and per-key rate limits refuse with 429 + Retry-After (units and the real stack)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.admission import AdmissionGate
from gateway.auth import ApiKey, KeyRing, parse_key_file
from gateway.errors import APIError
from gateway.rate_limit import RateLimiter

from .rstack import ReliabilityStack

CHAT = {"messages": [{"role": "user", "content": "Once upon a time"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("route", "body", "param", "option"),
    [
        ("/v1/completions", {"prompt": "a " * 400}, "prompt", "--max-prompt-tokens"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a " * 400}]}, "messages", "--max-prompt-tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 25}, "max_tokens", "--max-tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 25}, "max_completion_tokens", "--max-tokens"),
        ("/v1/completions", {"prompt": "a", "n": 3}, "n", "--max-n"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs", "--max-logprobs"),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs", "--max-logprobs"),
        ("/v1/completions", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop", "--max-stop-strings"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL] * 5}, "tools", "--max-tools"),
    ],
)  # fmt: skip
async def test_limits_are_400_naming_the_field(
    limited_stack: ReliabilityStack, route: str, body: dict[str, Any], param: str, option: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(limited_stack.url + route, json=body) as reply,
    ):
        error = (await reply.json())["error"]
        assert reply.status == 400, error
        assert error["param"] == param and option in error["message"], error
    # At the limits themselves a request is served.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            limited_stack.url + "/v1/completions",
            json={"prompt": "a", "max_tokens": 24, "n": 2, "logprobs": 5},
        ) as reply,
    ):
        assert reply.status == 200, await reply.text()


async def test_admission_by_queued_tokens() -> None:
    gate = AdmissionGate(max_waiting=10, max_running=0, max_waiting_tokens=100)
    async with gate.admit() as first:
        first.add_tokens(150)  # alone: let in, however long
        async with gate.admit() as second:
            with pytest.raises(APIError) as err:
                second.add_tokens(10)
            assert err.value.status == 429 and err.value.headers() == {"Retry-After": "1"}
        first.started()  # its tokens no longer wait
        async with gate.admit() as third:
            third.add_tokens(90)
            assert gate.num_waiting_tokens == 90
    assert (gate.num_waiting, gate.num_running, gate.num_waiting_tokens) == (0, 0, 0)


async def test_waiting_for_a_slot_ends_at_the_deadline() -> None:
    from gateway import deadline

    gate = AdmissionGate(max_waiting=10, max_running=1)
    async with gate.admit():
        deadline.start(0.05)
        with pytest.raises(APIError) as err:
            async with gate.admit():
                pass
        assert err.value.status == 504
        deadline.start(None)
    assert gate.num_waiting == 0


def test_rate_limiter_requests_and_tokens() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = ApiKey(b"k", requests_per_minute=10, tokens_per_minute=0)
    for _ in range(10):
        limiter.check(key)
    with pytest.raises(APIError) as err:
        limiter.check(key)
    assert err.value.status == 429 and err.value.retry_after_s == 60
    now[0] = 60.0
    limiter.check(key)  # the window moved on
    tokens = ApiKey(b"t", requests_per_minute=0, tokens_per_minute=100)
    limiter.check(tokens)
    limiter.add_tokens(tokens, 120)
    with pytest.raises(APIError) as err:
        limiter.check(tokens)
    assert "tokens per minute" in err.value.message
    now[0] = 120.0
    limiter.check(tokens)


def test_keys_constant_time_and_never_printed(tmp_path: Any) -> None:
    keys = parse_key_file("# team a\nsk-aaa rpm=10\nsk-bbb tpm=500  # batch\n\n", 0, 0, "keys.txt")
    assert [(k.requests_per_minute, k.tokens_per_minute) for k in keys] == [(10, 0), (0, 500)]
    ring = KeyRing(keys)
    assert ring.authenticate("Bearer sk-bbb") is keys[1]
    for header in ("", "Bearer ", "Bearer sk-aa", "Bearer sk-aaaa", "Basic sk-aaa", "sk-aaa"):
        with pytest.raises(APIError) as err:
            ring.authenticate(header)
        assert err.value.status == 401 and "sk-" not in err.value.message
    assert "sk-aaa" not in repr(keys[0]) and "sk-aaa" not in str(keys)
    with pytest.raises(ValueError, match=r"keys\.txt:1") as bad:
        parse_key_file("sk-secret rpm=ten", 0, 0, "keys.txt")
    assert "sk-secret" not in str(bad.value)
