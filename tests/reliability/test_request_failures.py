"""A request-level failure is not a worker failure (issue #27), and workers defend themselves
(issue #28).

Two workers on a tiny Qwen3 (the real Qwen3 tokenizer, whose `<think>` / `<tool_call>` are added
tokens) serve steady normal traffic while hostile constraints arrive one by one: a regex over a
special token's text, a Lark grammar of 3,000 chained rules (it overflowed llguidance's stack and
killed the worker), `a{1000000}` and a tool whose parameters are `{"$ref": "#"}`. Every normal
request succeeds, no worker process dies or leaves the rotation, and each hostile request gets
its own answer: the special-token regex works (the text is written with ordinary tokens), the
others are 4xx naming the field.

Then one worker with `--max-pending-requests 4` takes a burst of 1,500 concurrent direct
`Generate` calls: each either completes or is refused with RESOURCE_EXHAUSTED and a message
(grpc core used to cancel calls past 1,000 waiting to be picked up, with no message).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.common.server import wait_for_serving
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .rstack import ReliabilityStack, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_CLIENTS = 3
NUM_FLOOD_CALLS = 1500
CHAIN_RULES = 3000


def _chain_grammar(num_rules: int) -> str:
    rules = ["start: r0", *(f"r{i}: r{i + 1}" for i in range(num_rules)), f'r{num_rules}: "a"']
    return "\n".join(rules)


# (name, request body, expected status, expected `param` of the error or None)
HOSTILE: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("special-token regex <think>", {"prompt": "x", "guided_regex": "<think>"}, 200, None),
    ("special-token regex <tool_call>", {"prompt": "x", "guided_regex": "<tool_call>"}, 200, None),
    ("3,000 chained Lark rules", {"prompt": "x", "guided_grammar": _chain_grammar(CHAIN_RULES)}, 400, "guided_grammar"),
    ("a{1000000}", {"prompt": "x", "guided_regex": "a{1000000}"}, 400, "guided_regex"),
    (
        "$ref: # tool parameters",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
            "tool_choice": "required",
        },
        400,
        None,
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_stack(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReliabilityStack]:
    stack = ReliabilityStack(tmp_path_factory.mktemp("failures"), tiny_qwen3_dir, num_workers=2)
    try:
        yield stack.start()
    finally:
        stack.stop()


async def _normal_traffic(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[int]:
    statuses: list[int] = []
    while not stop.is_set():
        body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        async with session.post(url + "/v1/completions", json=body) as reply:
            await reply.read()
            statuses.append(reply.status)
    return statuses


async def _warm_grammar_checkers(addresses: list[str]) -> None:
    """One constrained request to each worker first: it starts the worker's grammar-checking
    child, whose tokenizer load (seconds for Qwen3's vocabulary at the child's low priority, on a
    CPU the normal traffic keeps busy) is not what the test below is about."""
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            request = worker_pb2.GenerateRequest(
                request_id="warm-up",
                prompt_token_ids=[9707],
                sampling=common_pb2.SamplingParams(
                    max_tokens=2, temperature=0.0, guided=common_pb2.GuidedDecoding(regex="ok")
                ),
            )
            async for _ in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=120):
                pass


async def test_hostile_constraints_fail_alone(qwen3_stack: ReliabilityStack) -> None:
    url = qwen3_stack.url
    await _warm_grammar_checkers(qwen3_stack.worker_addresses)
    pids = {name: proc.pid for name, proc in qwen3_stack.procs.items()}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [asyncio.create_task(_normal_traffic(session, url, stop)) for _ in range(NUM_CLIENTS)]
        answers: dict[str, tuple[int, dict[str, Any]]] = {}
        try:
            for name, body, _, _ in HOSTILE:
                route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                async with session.post(url + route, json={"max_tokens": 8, **body}) as reply:
                    answers[name] = (reply.status, await reply.json())
        finally:
            stop.set()
            normal = [status for statuses in await asyncio.gather(*clients) for status in statuses]
        async with session.get(url + "/health") as reply:
            health = await reply.json()

    for name, _, status, param in HOSTILE:
        got, body = answers[name]
        assert got == status, (name, got, body)
        if status == 200:
            assert body["choices"][0]["text"] == name.rsplit(" ", 1)[1], (name, body)
        else:
            assert param is None or body["error"]["param"] == param, (name, body)
            assert "Traceback" not in body["error"]["message"]
    assert normal and all(s == 200 for s in normal), sorted(set(normal))
    for name, proc in qwen3_stack.procs.items():  # nothing died, nothing was restarted
        assert proc.poll() is None and proc.pid == pids[name], (name, qwen3_stack.log_tail(name))
    assert all(health["worker"].values()), health
    # no request made the gateway take a worker out (the health poller may, on a starved CPU)
    assert "failed; taken out of rotation" not in (qwen3_stack.run_dir / "gateway.log").read_text()


def _generate(i: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id=f"flood-{i}",
        prompt_token_ids=[9707, 1052],
        sampling=common_pb2.SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0),
    )


async def test_worker_refuses_past_its_admission_limit(qwen3_stack: ReliabilityStack) -> None:
    """A worker of its own (not in the gateway's rotation) with a small admission limit."""
    name, address = "worker-limited", f"unix:{qwen3_stack.run_dir}/worker-limited.sock"
    qwen3_stack.worker_addresses.append(address)
    qwen3_stack.worker_args = ["--max-pending-requests", "4"]
    qwen3_stack.start_worker(len(qwen3_stack.worker_addresses) - 1)
    qwen3_stack.procs[name] = qwen3_stack.procs.pop("worker-2")
    # (a channel opened before the worker listens would wait out grpc's reconnect backoff)
    await wait_for_serving(address, timeout_s=120)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for _ in range(600):  # the servicer is registered once the model is loaded
            try:
                await stub.Info(worker_pb2.InfoRequest(), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)

        async def one(i: int) -> tuple[str, str]:
            try:
                async for _ in stub.Generate(_generate(i), timeout=60):
                    pass
                return "OK", ""
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""

        results = await asyncio.gather(*(one(i) for i in range(NUM_FLOOD_CALLS)))
    codes = [code for code, _ in results]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, sorted(set(results))
    assert codes.count("OK") >= 4 and "RESOURCE_EXHAUSTED" in codes, codes
    assert all("--max-pending-requests 4" in details for code, details in results if code != "OK")
    print(json.dumps({c: codes.count(c) for c in set(codes)}))


async def test_gateway_takes_a_full_worker_as_back_pressure(qwen3_stack: ReliabilityStack) -> None:
    """A gateway whose only worker is the limited one: past its limit the clients get 429 (not
    503 or 500) and the worker is never taken out of rotation. Runs after the test above."""
    address = f"unix:{qwen3_stack.run_dir}/worker-limited.sock"
    assert "worker-limited" in qwen3_stack.procs, "needs test_worker_refuses_past_its_admission_limit"
    port = free_port()
    qwen3_stack.start_gateway("gateway-limited", port, workers=[address])
    qwen3_stack.wait_healthy(port, 120, all_workers=True)
    body = {"prompt": "Hello there", "max_tokens": 16, "ignore_eos": True, "temperature": 0}

    async def one(session: aiohttp.ClientSession) -> int:
        async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as reply:
            answer = await reply.json()
            if reply.status == 429:  # the worker's refusal, not the gateway's own --max-waiting
                assert reply.headers.get("Retry-After") == "1"
                assert answer["error"]["message"] == "every worker is at capacity; retry shortly", answer
            return reply.status

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        statuses = await asyncio.gather(*(one(session) for _ in range(24)))
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    log = (qwen3_stack.run_dir / "gateway-limited.log").read_text()
    assert "failed; taken out of rotation" not in log
