"""AsyncEngine.call: a caller that stops waiting (its task cancelled, e.g. a FetchKV stream the
decode worker closed while its next chunk was being read on the engine thread) leaves the engine
thread serving the next call."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from services.worker.async_engine import AsyncEngine
from services.worker.config import WorkerConfig
from services.worker.engine import Engine


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
