"""Interleave several async streams as they produce (one task per stream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Yield items of all `streams` in arrival order; the first error ends them all and is raised.

    Closing the merged stream (or cancelling its consumer) cancels every pump, which cancels the
    underlying rpcs.
    """
    if len(streams) == 1:
        # One stream needs no pump: iterating it here saves a task switch and a queue hand-off
        # per item (one per streamed token of every single-prompt request).
        stream = streams[0]
        try:
            async for value in stream:
                yield value
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    queue: asyncio.Queue[T | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
