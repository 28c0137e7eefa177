"""Where a DetokenizeStream's work runs: one-token deltas on the event loop, large deltas and the
final decode of a long choice in the thread pool; the text is the same either way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from services.common.server import GrpcServer
from services.styler.detokenize_work import INLINE_MAX_FINISH_TOKENS, INLINE_MAX_NEW_TOKENS
from services.styler.rpc import SERVICE_NAME, StylerServicer, add_to_server
from tandem.v1 import styler_pb2, styler_pb2_grpc

from .helpers import load_styler, needs_shared, reference_tokenizer, shared_dir

QWEN3 = shared_dir() / "tokenizers" / "qwen3"
pytestmark = [needs_shared, pytest.mark.skipif(not QWEN3.is_dir(), reason="needs shared/tokenizers/qwen3")]

TEXT = "Streaming 日本語 text, emoji 👍🏽 and plain words, " * 40


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that counts the jobs it was given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.num_submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.num_submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
async def served() -> AsyncIterator[tuple[styler_pb2_grpc.StylerStub, CountingExecutor]]:
    server = GrpcServer("127.0.0.1:0", grace_s=1.0)
    with CountingExecutor() as executor:
        add_to_server(StylerServicer(load_styler(str(QWEN3)), executor), server.server)
        server.add_service_name(SERVICE_NAME)
        await server.start()
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            yield styler_pb2_grpc.StylerStub(channel), executor
        await server.stop()


async def _stream(stub: styler_pb2_grpc.StylerStub, ids: list[int], step: int, stop: list[str]) -> str:
    """Detokenize `ids` in deltas of `step` ids; the text."""

    async def requests() -> AsyncIterator[styler_pb2.DetokenizeStreamRequest]:
        yield styler_pb2.DetokenizeStreamRequest(start=styler_pb2.DetokenizeStreamStart(stop=stop))
        for i in range(0, len(ids), step):
            delta = styler_pb2.TokenDelta(index=0, token_ids=ids[i : i + step], finished=i + step >= len(ids))
            yield styler_pb2.DetokenizeStreamRequest(deltas=styler_pb2.TokenDeltas(deltas=[delta]))

    return "".join([d.text async for reply in stub.DetokenizeStream(requests()) for d in reply.deltas])


@pytest.mark.parametrize("stop", [[], ["never in the text"]])
async def test_small_deltas_run_on_the_loop_large_ones_in_the_pool(
    served: tuple[styler_pb2_grpc.StylerStub, CountingExecutor], stop: list[str]
) -> None:
    stub, executor = served
    ids = reference_tokenizer(str(QWEN3)).encode(TEXT)
    assert len(ids) > INLINE_MAX_FINISH_TOKENS
    short = ids[:INLINE_MAX_FINISH_TOKENS]

    # One id per delta, the final one short enough: nothing leaves the event loop.
    assert await _stream(stub, short, 1, stop) == load_styler(str(QWEN3)).detokenize(short)
    assert executor.num_submitted == 0

    # Deltas past INLINE_MAX_NEW_TOKENS ids go to the pool (not the last, shorter one).
    step = INLINE_MAX_NEW_TOKENS + 1
    assert await _stream(stub, short, step, stop) == load_styler(str(QWEN3)).detokenize(short)
    assert executor.num_submitted == len(short) // step

    # A long choice in one-id deltas: only its final delta (a decode of the whole sequence) does.
    executor.num_submitted = 0
    assert await _stream(stub, ids, 1, stop) == TEXT
    assert executor.num_submitted == 1
