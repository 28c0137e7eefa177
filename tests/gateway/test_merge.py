"""merge_streams: one stream is iterated in the consumer's own task (no pump task, no queue per
item), and closing the merged stream still closes it; several are interleaved by pump tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.merge import merge_streams


async def test_one_stream_runs_in_the_consumers_task_and_is_closed_with_it() -> None:
    tasks: list[asyncio.Task[object] | None] = []
    closed: list[bool] = []

    async def stream() -> AsyncIterator[int]:
        try:
            for i in range(10):
                tasks.append(asyncio.current_task())
                yield i
        finally:
            closed.append(True)

    merged = merge_streams([stream()])
    assert [await anext(merged) for _ in range(3)] == [0, 1, 2]
    assert set(tasks) == {asyncio.current_task()}
    await merged.aclose()  # the consumer stops early: the stream's clean-up runs now
    assert closed == [True]


async def test_several_streams_interleave_and_the_first_error_ends_them() -> None:
    finished: list[str] = []

    async def ok(name: str) -> AsyncIterator[str]:
        try:
            for i in range(3):
                yield f"{name}{i}"
                await asyncio.sleep(0)
            await asyncio.Event().wait()  # never ends by itself
        finally:
            finished.append(name)

    async def failing() -> AsyncIterator[str]:
        yield "f0"
        await asyncio.sleep(0)
        raise ValueError("boom")

    got: list[str] = []
    try:
        async for item in merge_streams([ok("a"), ok("b"), failing()]):
            got.append(item)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the error was not raised")
    assert {"a0", "b0", "f0"} <= set(got)
    assert sorted(finished) == ["a", "b"]  # the other streams were cancelled
