"""Where the work of a detokenize stream runs: on the event loop when it is small, in the
thread pool when it is not.

Most token deltas are one decode step of one choice, whose detokenizing (a short window decode,
the stop matcher, the parsers) costs less than handing it to a thread does (submit, wake a
thread, chain the future back with call_soon_threadsafe, wake the loop): so small deltas run
inline. Two kinds of work are large enough to be worth the hop, and would stall every other
stream of the process if they ran on the loop: a delta of many ids (the worker merged many steps;
with stop strings each id is fed on its own) and the final delta of a long choice (`finish`
decodes the whole sequence once). Those go to the pool, where the tokenizer's decode releases
the GIL and runs beside the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

from services.styler.stream import DetokenizeSession, StreamDelta

# A delta of at most this many new ids (over all its choices) runs on the event loop...
INLINE_MAX_NEW_TOKENS = 16
# ... unless it finishes a choice of more ids than this (the final decode covers them all).
INLINE_MAX_FINISH_TOKENS = 512

# (choice index, new token ids, finished) per choice
TokenDeltas = Sequence[tuple[int, Sequence[int], bool]]


def runs_inline(session: DetokenizeSession, deltas: TokenDeltas) -> bool:
    """Whether `deltas` are cheap enough to detokenize on the event loop."""
    num_new = 0
    for index, ids, finished in deltas:
        num_new += len(ids)
        if finished and session.num_tokens(index) + len(ids) > INLINE_MAX_FINISH_TOKENS:
            return False
    return num_new <= INLINE_MAX_NEW_TOKENS


def add_deltas_now(session: DetokenizeSession, deltas: TokenDeltas) -> list[StreamDelta]:
    return [session.add(index, ids, finished) for index, ids, finished in deltas]


async def add_deltas(
    session: DetokenizeSession, deltas: TokenDeltas, executor: Executor
) -> list[StreamDelta]:
    """The text deltas of `deltas` (raises ValueError for a bad choice index)."""
    if runs_inline(session, deltas):
        return add_deltas_now(session, deltas)
    return await asyncio.get_running_loop().run_in_executor(executor, add_deltas_now, session, deltas)
