"""AsyncEngine.call: a caller that stops waiting (its task cancelled, e.g. a FetchKV stream the
decode worker closed while its next chunk was being read on the engine thread) leaves the engine
thread serving the next call; with TANDEM_ENGINE_HANDOFF each step's outputs reach the event loop
before the next step begins."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from services.worker.async_engine import AsyncEngine
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.outputs import RequestOutput
from services.worker.request import EngineRequest, SamplingParams


def test_a_cancelled_call_does_not_end_the_engine_thread(stories_dir: Path) -> None:
    engine = AsyncEngine(Engine(WorkerConfig(model=str(stories_dir), device="cpu", kv_cache_memory="4MiB")))
    engine.start()
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(10)
        return 1

    async def run() -> int:
        task = asyncio.ensure_future(engine.call(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()  # the caller gives up while `slow` runs on the engine thread
        await asyncio.sleep(0)
        release.set()
        return await asyncio.wait_for(engine.call(lambda: 2), 10)

    try:
        assert asyncio.run(run()) == 2
    finally:
        engine.stop()


@pytest.mark.parametrize("handoff", [0.0, 30.0])
def test_a_step_s_outputs_reach_the_loop_before_the_next_step_with_the_handoff(
    stories_dir: Path, handoff: float
) -> None:
    """TANDEM_ENGINE_HANDOFF: the engine thread waits for the event loop to take each step's
    outputs (its streams' sinks run then: the GenerateMany chunks) before it starts the next step,
    so every output is taken while its own step is the last one begun; the outputs are the same
    either way."""
    config = WorkerConfig(model=str(stories_dir), device="cpu", kv_cache_memory="4MiB")
    engine = AsyncEngine(Engine(config), handoff=handoff)
    steps = 0
    step = engine.engine.step

    def counted() -> Any:
        nonlocal steps
        steps += 1
        return step()

    engine.engine.step = counted  # type: ignore[method-assign]
    engine.start()
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    lag: list[int] = []

    def sink(out: RequestOutput) -> bool:  # on the loop, as the step's outputs are taken
        lag.append(steps)  # the steps begun by then
        return False  # (queued as well)

    async def run() -> list[int]:
        outputs = engine.submit(EngineRequest("r", (1, 403, 251, 263), sp), sink=sink)
        tokens = []
        while True:
            out = await outputs.get()
            assert not isinstance(out, BaseException)
            tokens += out.choices[0].token_ids
            if out.finished:
                return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        engine.stop()
    assert len(tokens) == 12
    if handoff:  # the k-th output was taken before step k + 1 began
        assert lag == list(range(1, 13)), str(lag)
