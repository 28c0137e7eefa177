"""The gateway in disaggregated mode, with real processes: a styler, one prefill and two decode
workers behind one gateway, two unified workers behind another (the reference).

Workers are killed with SIGKILL in the middle of 32 requests; every request still completes with
exactly the text an undisturbed run gives (seeded sampling continues where it stopped).
The tests of this module run in order and share the stack (each kill is permanent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from disagg_stack import Processes
from openai import OpenAI

pytestmark = pytest.mark.e2e

NUM_REQUESTS = 32
VOCAB = 512


@pytest.fixture(scope="module")
def stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("disagg"), stories_dir)
    try:
        procs.styler()
        procs.worker("prefill", "--role", "prefill")
        procs.worker("decode-0", "--role", "decode")
        procs.worker("decode-1", "--role", "decode")
        procs.worker("unified-0")
        procs.worker("unified-1")
        procs.gateway(
            "gw-disagg",
            "--prefill-worker",
            procs.address("prefill"),
            "--decode-worker",
            procs.address("decode-0"),
            "--decode-worker",
            procs.address("decode-1"),
        )
        procs.gateway(
            "gw-unified", "--worker", procs.address("unified-0"), "--worker", procs.address("unified-1")
        )
        procs.wait_healthy("gw-disagg")
        procs.wait_healthy("gw-unified")
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def unified(stack: Processes) -> Callable[[int], list[str]]:
    """The unified gateway's answers by max_tokens, each computed once (before the last test
    kills a unified worker): the expected texts of several tests."""
    answers: dict[int, list[str]] = {}

    def get(max_tokens: int) -> list[str]:
        if max_tokens not in answers:
            answers[max_tokens] = complete_all(client(stack, "gw-unified"), max_tokens)
        return answers[max_tokens]

    return get


def client(stack: Processes, gateway: str) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{stack.ports[gateway]}/v1", api_key="unused", max_retries=0)


def request(i: int, max_tokens: int) -> dict[str, Any]:
    """Token-id prompts (a shared 20-token head for half of them), seeded sampling or greedy."""
    head = [1, *[(37 * k) % (VOCAB - 3) + 3 for k in range(19)]]
    tail = [(i * 53 + k * 11) % (VOCAB - 3) + 3 for k in range(3 + i % 17)]
    prompt = head + tail if i % 2 else [1, *tail]
    sampling: dict[str, Any] = {"temperature": 0.0} if i % 4 == 0 else {"temperature": 1.0, "seed": 100 + i}
    return dict(
        model="stories260K", prompt=prompt, max_tokens=max_tokens, extra_body={"ignore_eos": True}, **sampling
    )


def complete_all(oai: OpenAI, max_tokens: int) -> list[str]:
    def one(i: int) -> str:
        reply = oai.completions.create(**request(i, max_tokens))
        assert reply.choices[0].finish_reason == "length"
        return reply.choices[0].text

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        return list(pool.map(one, range(NUM_REQUESTS)))


def stream_all(oai: OpenAI, max_tokens: int, kill: Any) -> list[str]:
    """32 streams; `kill()` runs once most of them have produced text and none has finished."""
    progress = [0] * NUM_REQUESTS
    started = threading.Event()

    def one(i: int) -> str:
        parts = []
        for chunk in oai.completions.create(**request(i, max_tokens), stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].text)
                progress[i] += 1
                if sum(p >= 2 for p in progress) >= NUM_REQUESTS // 2:
                    started.set()
        return "".join(parts)

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(NUM_REQUESTS)]
        assert started.wait(60), "streams did not start"
        assert not any(f.done() for f in futures), "a stream finished before the kill: make them longer"
        kill()
        return [f.result(timeout=120) for f in futures]


def test_disaggregated_gateway_matches_unified(stack: Processes, unified: Callable[[int], list[str]]) -> None:
    health = stack.wait_healthy("gw-disagg")
    assert set(health["prefill_worker"]) == {"prefill_worker-0"}
    expected = unified(24)
    assert complete_all(client(stack, "gw-disagg"), 24) == expected
    decode_logs = stack.log("decode-0") + stack.log("decode-1")
    assert "fetched KV" in decode_logs
    assert "(layer-wise" in decode_logs  # the gateway started each decode at the prefill's admission


def test_decode_worker_killed_mid_stream(stack: Processes, unified: Callable[[int], list[str]]) -> None:
    # long enough that no stream can finish before most have started, even on a loaded machine;
    # the expected texts come from the unified workers meanwhile (they share nothing with these)
    # The gateway may have routed every stream to one decode worker (load and cache routing): the
    # one killed is the one whose log shows the most of these streams' KV fetches.
    marks = {name: len(stack.log(name)) for name in ("decode-0", "decode-1")}

    def kill_the_busier() -> None:
        stack.kill(max(marks, key=lambda name: stack.log(name)[marks[name] :].count("fetched KV")))

    with ThreadPoolExecutor(1) as pool:
        expected = pool.submit(unified, 200)
        texts = stream_all(client(stack, "gw-disagg"), 200, kill_the_busier)
    assert texts == expected.result()  # nothing lost, nothing repeated
    assert "resuming elsewhere" in stack.log("gw-disagg")


def test_prefill_worker_killed_mid_load(stack: Processes, unified: Callable[[int], list[str]]) -> None:
    expected = unified(24)
    oai = client(stack, "gw-disagg")
    done = [False] * NUM_REQUESTS
    first_done, killed = threading.Event(), threading.Event()
    half = NUM_REQUESTS // 2

    def one(i: int) -> str:
        if i < half:
            time.sleep(0.04 * i)  # the first half's arrivals spread out; some are in flight at the kill
        else:
            assert killed.wait(120)  # the second half arrives after the kill
        reply = oai.completions.create(**request(i, 24))
        done[i] = True
        first_done.set()
        return reply.choices[0].text

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(NUM_REQUESTS)]
        assert first_done.wait(120)  # the kill lands once the stack has answered (a condition, not a delay)
        stack.kill("prefill")
        done_at_kill = sum(done)
        killed.set()
        texts = [f.result(timeout=120) for f in futures]
    assert 0 < done_at_kill <= half, done_at_kill
    assert texts == expected
    assert complete_all(oai, 8) == complete_all(client(stack, "gw-unified"), 8)  # still serving


def test_unified_worker_killed_mid_stream(stack: Processes, unified: Callable[[int], list[str]]) -> None:
    oai = client(stack, "gw-unified")
    expected = unified(200)
    texts = stream_all(oai, 200, lambda: stack.kill("unified-0"))
    assert texts == expected
    assert "resuming elsewhere" in stack.log("gw-unified")
