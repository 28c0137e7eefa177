"""Load on the real stack: client disconnects, 200 concurrent streams, two workers and a failure."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def worker_load(address: str) -> tuple[int, int]:
    from tandem.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        load = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    return load.num_running, load.num_waiting


def test_client_disconnect_aborts_on_the_worker_within_a_second(stories_stack: Stack) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=stories_stack.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for _ in range(6):  # a few chunks: the request is running on the worker
            next(lines)
        assert worker_load(stories_stack.worker_addresses[0])[0] == 1
    disconnected = time.monotonic()
    while worker_load(stories_stack.worker_addresses[0]) != (0, 0):
        assert time.monotonic() - disconnected < 1.0, (
            "the worker still runs the request 1 s after the disconnect"
        )
        time.sleep(0.02)


def test_stop_string_aborts_on_the_worker_and_counts_what_was_returned(stories_stack: Stack) -> None:
    """A stop string ends the choice: the worker aborts the request (by the Abort rpc, its stream
    then ending by itself) and the usage counts the tokens up to the stop, not what the worker
    generated before it heard of the abort."""
    body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stop": ["."]}
    with httpx.Client(base_url=stories_stack.url, timeout=60) as http:
        reply = http.post("/v1/completions", json=body)
        answered = time.monotonic()
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] < 480
        while worker_load(stories_stack.worker_addresses[0]) != (0, 0):
            assert time.monotonic() - answered < 1.0, "the worker still runs the stopped request"
            time.sleep(0.02)


async def test_200_concurrent_streams_equal_whole_responses(stories_stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=300)

    async def streamed(seed: int) -> str:
        stream = await client.completions.create(
            model="stories260K", prompt="Once upon a time", max_tokens=12, seed=seed, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def whole(seed: int) -> str:
        reply = await client.completions.create(
            model="stories260K", prompt="Once upon a time", max_tokens=12, seed=seed
        )
        return reply.choices[0].text

    seeds = range(200)
    texts = await asyncio.gather(*(streamed(s) for s in seeds))
    wholes = await asyncio.gather(*(whole(s) for s in seeds))
    assert list(texts) == list(wholes)
    assert len(set(texts)) > 10  # different seeds really sample differently
    await client.close()


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, name + labels
    return float(match.group(1))


def worker_stream_counts(stack: Stack) -> tuple[float, float]:
    """(messages the workers sent on their GenerateMany streams, session answers in them)."""
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    return (
        _metric(text, "tandem:gateway_worker_stream_messages_total", '{direction="received"}'),
        _metric(text, "tandem:gateway_worker_session_messages_total", '{direction="received"}'),
    )


async def test_worker_stream_messages_batch_a_steps_tokens_at_concurrency_32(stories_stack: Stack) -> None:
    """The gateway's Generate calls share one GenerateMany stream, and the worker sends each
    engine step's tokens for all of them as one message: /metrics shows far fewer messages from
    the worker than tokens (one Generate rpc per request took at least one message per token)."""
    client = openai.AsyncOpenAI(base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=120)
    messages_before, answers_before = worker_stream_counts(stories_stack)

    async def streamed(i: int) -> int:
        stream = await client.completions.create(
            model="stories260K",
            prompt=f"Once upon a time {i}",
            max_tokens=48,
            seed=i,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return sum([1 async for c in stream if c.choices and c.choices[0].text is not None])

    await asyncio.gather(*(streamed(i) for i in range(32)))
    await client.close()
    messages, answers = worker_stream_counts(stories_stack)
    tokens = 32 * 48
    assert answers - answers_before >= tokens // 2  # (chunks may carry several tokens; plus the ends)
    assert messages - messages_before < tokens / 4, (messages - messages_before, tokens)


async def test_packed_tokens_give_the_text_of_one_rpc_per_request(
    stories_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack's gateway reads the worker's single-token chunks packed (its GenerateMany stream
    accepts them); a gateway with TANDEM_GENERATE_MUX=0 sends one Generate rpc per request, which
    has no packed form. Both give every choice the same text: chat, a batch of prompts (choice
    indexes past 0), n = 2 and logprobs, streamed, at once."""
    monkeypatch.setenv("TANDEM_GENERATE_MUX", "0")
    with stories_stack.extra_gateway("gateway-rpc") as rpc_url:
        packed = openai.AsyncOpenAI(
            base_url=stories_stack.base_url, api_key="unused", max_retries=0, timeout=120
        )
        rpc = openai.AsyncOpenAI(base_url=rpc_url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def completion(client: openai.AsyncOpenAI, seed: int, **kw: object) -> dict[int, str]:
            stream = await client.completions.create(
                model="stories260K",
                max_tokens=32,
                seed=seed,
                stream=True,
                extra_body={"ignore_eos": True},
                **kw,
            )
            text: dict[int, str] = {}
            async for chunk in stream:
                for c in chunk.choices:
                    text[c.index] = text.get(c.index, "") + c.text
            return text

        async def chat(client: openai.AsyncOpenAI, seed: int) -> str:
            stream = await client.chat.completions.create(
                model="stories260K",
                messages=[{"role": "user", "content": f"Tell a story {seed}"}],
                max_tokens=32,
                seed=seed,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def run(client: openai.AsyncOpenAI) -> tuple[list[dict[int, str]], list[str]]:
            completions = asyncio.gather(
                *(completion(client, i, prompt=f"Once upon a time {i}") for i in range(8)),
                completion(client, 20, prompt=["Once", "The dog", "A girl"]),
                completion(client, 21, prompt="Once upon a time", n=2),
                completion(client, 22, prompt="Once upon a time", logprobs=2),
            )
            chats = asyncio.gather(*(chat(client, 30 + i) for i in range(4)))
            return list(await completions), list(await chats)

        over_packed, over_rpc = await run(packed), await run(rpc)
        await packed.close()
        await rpc.close()
    assert over_packed == over_rpc
    completions, chats = over_packed
    assert set(completions[8]) == {0, 1, 2} and set(completions[9]) == {0, 1}
    assert len({str(t) for t in completions}) == len(completions)  # the seeds really differ
    assert len(set(chats)) == len(chats) and all(chats)


@pytest.fixture(scope="module", params=["mux", "rpc"])
def two_workers(
    request: pytest.FixtureRequest, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two workers behind one gateway: its Generate calls on one GenerateMany stream per worker
    (the default), or one Generate rpc per request (TANDEM_GENERATE_MUX=0): a worker's death
    fails over the same way."""
    stack = Stack(tmp_path_factory.mktemp("two"), stories_dir, num_workers=2)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TANDEM_GENERATE_MUX", "1" if request.param == "mux" else "0")
            stack.start()
        yield stack
    finally:
        stack.stop()


def served_by_worker(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    found = re.findall(r'tandem:gateway_worker_requests_total\{worker="([^"]+)"\} ([0-9.e+]+)', text)
    return {worker: float(count) for worker, count in found}


async def test_two_workers_share_the_load_and_survive_a_failure(two_workers: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=two_workers.base_url, api_key="unused", max_retries=0, timeout=120)

    async def complete(i: int) -> str:
        reply = await client.completions.create(
            model="stories260K", prompt=f"Once upon a time {i}", max_tokens=20, seed=i
        )
        return reply.choices[0].finish_reason

    await asyncio.gather(*(complete(i) for i in range(24)))
    counts = served_by_worker(two_workers)
    # /metrics and /health name workers (not their socket paths) without --expose-internal-addresses
    assert set(counts) == {"worker-0", "worker-1"}
    assert str(two_workers.run_dir) not in httpx.get(two_workers.url + "/metrics", timeout=10).text
    assert min(counts.values()) >= 6, counts  # least-load routing spreads a burst

    two_workers.kill("worker-0")
    results = await asyncio.gather(*(complete(i) for i in range(24)))  # all succeed on the survivor
    assert len(results) == 24
    health = httpx.get(two_workers.url + "/health", timeout=10).json()
    assert health["worker"] == {"worker-0": False, "worker-1": True}

    # a restarted worker is put back in rotation once healthy
    two_workers._spawn(
        "worker-0",
        [
            "worker",
            "--model",
            str(two_workers.model),
            "--address",
            two_workers.worker_addresses[0],
            "--device",
            "cpu",
        ],
    )
    deadline = time.monotonic() + 120
    while not httpx.get(two_workers.url + "/health", timeout=10).json()["worker"]["worker-0"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)
    before = served_by_worker(two_workers)["worker-0"]
    await asyncio.gather(*(complete(100 + i) for i in range(12)))
    assert served_by_worker(two_workers)["worker-0"] > before
    await client.close()
