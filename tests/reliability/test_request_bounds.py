"""Bounded work per request and cheap early refusals: prompts x n is capped, admission counts a
request's sequences and a bound of its tokens known before tokenizing, a prompt too long by its
bytes alone is refused untokenized, and one big request does not starve a small one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.admission import AdmissionGate
from gateway.errors import APIError
from services.styler.tokenizer import Tokenizer

from .rstack import ReliabilityStack

SHARED = Path(__file__).resolve().parents[3] / "shared"


@pytest.mark.e2e
async def test_too_many_prompts_is_400_naming_prompt(limited_stack: ReliabilityStack) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"prompt": ["a"] * 2000, "max_tokens": 1}
        async with session.post(limited_stack.url + "/v1/completions", json=body) as reply:
            error = (await reply.json())["error"]
            assert reply.status == 400, error
            assert error["param"] == "prompt" and "--max-sequences-per-request" in error["message"], error
        # Within the cap (default 256) a many-prompt request is served, one choice per prompt x n.
        body = {"prompt": ["a", "b"] * 32, "max_tokens": 2, "n": 2}
        async with session.post(limited_stack.url + "/v1/completions", json=body) as reply:
            assert reply.status == 200, await reply.text()
            assert len((await reply.json())["choices"]) == 128


@pytest.mark.e2e
async def test_prompt_too_long_by_bytes_is_refused_before_tokenizing(limited_stack: ReliabilityStack) -> None:
    # stories260K: tokens of at most 7 bytes and --max-prompt-tokens 200, so 2,000 bytes are too
    # many without tokenizing them ("at least": the bound, not a count).
    async with (
        aiohttp.ClientSession() as session,
        session.post(limited_stack.url + "/v1/completions", json={"prompt": "ab " * 700_000}) as reply,
    ):
        error = (await reply.json())["error"]
        assert reply.status == 400, error
        assert error["param"] == "prompt" and "at least" in error["message"], error


async def test_admission_counts_sequences_and_refuses_by_a_token_bound_first() -> None:
    gate = AdmissionGate(max_waiting=10, max_running=0, max_waiting_tokens=100)
    async with gate.admit(num_sequences=8) as big:
        assert gate.num_waiting == 8
        with pytest.raises(APIError) as refused:
            async with gate.admit(num_sequences=4):
                pass
        assert refused.value.status == 429 and "--max-waiting" in refused.value.message
        async with gate.admit(num_sequences=2):
            assert gate.num_waiting == 10
        big.add_tokens(90)
        # 20 tokens at least (known from the bytes) overflow the token queue: refused before
        # anything is tokenized or counted.
        with pytest.raises(APIError) as refused:
            async with gate.admit(num_sequences=1, min_tokens=20):
                pass
        assert refused.value.status == 429 and "--max-waiting-tokens" in refused.value.message
        big.started()
        assert gate.num_waiting == 0 and gate.num_waiting_tokens == 0
    # A lone request is let in whatever its size (it is bounded by the per-request cap).
    async with gate.admit(num_sequences=50, min_tokens=500):
        assert gate.num_waiting == 50
    assert gate.num_waiting == 0


def test_long_tokenization_leaves_the_event_loop_threads_running() -> None:
    """The styler tokenizes in its thread pool; the tokenizer must let go of the GIL meanwhile,
    or a long prompt stalls every other request of the styler."""
    tokenizer = Tokenizer.from_dir(str(SHARED / "tokenizers" / "qwen2.5"))
    text = "hello world, this is a long prompt. " * 40_000
    done = threading.Event()
    thread = threading.Thread(target=lambda: (tokenizer.encode(text), done.set()))
    ticks = 0
    thread.start()
    while not done.is_set():
        done.wait(0.001)
        ticks += 1
    thread.join()
    assert ticks > 20, "the main thread did not run while the tokenizer worked"


def test_styler_reports_the_most_bytes_a_token_stands_for() -> None:
    for name, expected in (("qwen2.5", 384), ("llama3.1", 128)):  # NFC (x3) and none
        assert Tokenizer.from_dir(str(SHARED / "tokenizers" / name)).info().max_token_bytes == expected


@pytest.fixture(scope="module")
def few_seqs_stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReliabilityStack]:
    stack = ReliabilityStack(
        tmp_path_factory.mktemp("few-seqs"), stories_dir, worker_args=["--max-num-seqs", "8"]
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.mark.e2e
async def test_small_request_starts_within_a_few_steps_of_a_big_one(few_seqs_stack: ReliabilityStack) -> None:
    """32 prompts x n=2 fill the worker's 8 sequence slots for many steps; a one-prompt request
    sent meanwhile gets its first token after at most a few steps' worth of the big request's
    tokens (8 a step), not after the big request's 32 prompts."""
    url = few_seqs_stack.url + "/v1/completions"
    big_body = {
        "prompt": ["Once upon a time"] * 32,
        "n": 2,
        "max_tokens": 64,
        "ignore_eos": True,
        "stream": True,
    }
    big_tokens = 0
    started = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def big() -> None:
            nonlocal big_tokens
            async with session.post(url, json=big_body) as reply:
                assert reply.status == 200
                async for line in reply.content:
                    if line.startswith(b"data: {"):
                        big_tokens += sum(1 for c in json.loads(line[6:])["choices"] if c["text"])
                        if big_tokens >= 16:
                            started.set()

        big_task = asyncio.create_task(big())
        await started.wait()
        at_send = big_tokens
        small = {"prompt": "Hello", "max_tokens": 2, "stream": True}
        async with session.post(url, json=small) as reply:
            assert reply.status == 200
            async for line in reply.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break
        waited = big_tokens - at_send
        big_task.cancel()
    assert waited <= 8 * 6, f"the small request waited {waited} big-request tokens (~{waited // 8} steps)"
