"""The worker's GenerateMany mux (services/worker/generate_mux.py) on its own, its sessions run by
stand-in Generate bodies: a chunk of one token goes packed (`token_sessions` / `token_ids`) only on
a stream whose caller set `accepts_packed_tokens`; within one message a session's packed tokens
come before its answers, so once it has an answer there its later chunks are answers too; a
cancelled session's tokens are dropped. (The real servicer's `take`, which decides what may go
packed, is tested against a real worker in tests/gateway/test_generate_mux.py.)"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable

import grpc

from services.worker.generate_mux import GenerateMux, SessionContext
from services.worker.outputs import ChoiceOutput, RequestOutput
from services.worker.request import TokenLogprob
from services.worker.rpc import fill_output_pb
from tandem.v1 import worker_pb2

Body = Callable[[SessionContext], AsyncIterator[worker_pb2.GenerateResponse]]


def _fill(token_id: int, logprobs: bool = False) -> Callable[[worker_pb2.GenerateResponse], object]:
    """What rpc.py's `take` emits for an output of one token (with a logprob: not packable)."""
    lp = (TokenLogprob(token_id, -0.25, 1, ()),) if logprobs else None
    out = RequestOutput("r", (ChoiceOutput(0, (token_id,), lp),))
    return functools.partial(fill_output_pb, out=out)


def _start(session_id: int) -> worker_pb2.GenerateSessionRequest:
    request = worker_pb2.GenerateRequest(request_id=f"r{session_id}", prompt_token_ids=[1, 2])
    return worker_pb2.GenerateSessionRequest(
        session_id=session_id, start=worker_pb2.GenerateSessionStart(request=request)
    )


async def _serve(
    body: Body,
    accepts_packed_tokens: bool,
    session_ids: tuple[int, ...] = (1,),
    written: list[worker_pb2.GenerateManyResponse] | None = None,
) -> list[worker_pb2.GenerateManyResponse]:
    """Run one stream whose sessions run `body`; the messages the worker wrote (also appended to
    `written` as they go, for a body that waits on them)."""
    written = [] if written is None else written

    async def write(message: worker_pb2.GenerateManyResponse) -> None:
        written.append(message)

    async def generate(
        request: worker_pb2.GenerateRequest, context: SessionContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for chunk in body(context):
            yield chunk

    async def requests() -> AsyncIterator[worker_pb2.GenerateManyRequest]:
        starts = [_start(sid) for sid in session_ids]
        yield worker_pb2.GenerateManyRequest(requests=starts, accepts_packed_tokens=accepts_packed_tokens)

    mux = GenerateMux(generate, write)
    await asyncio.wait_for(mux.serve(requests()), 10)
    return written


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not met")


def _session_streams(messages: list[worker_pb2.GenerateManyResponse]) -> dict[int, list[object]]:
    """Each session's chunks' tokens (and "end"), read as the contract says: a message's packed
    tokens first, then its answers."""
    streams: dict[int, list[object]] = {}
    for message in messages:
        assert len(message.token_sessions) == len(message.token_ids)
        for sid, token_id in zip(message.token_sessions, message.token_ids, strict=True):
            streams.setdefault(sid, []).append(token_id)
        for answer in message.responses:
            if answer.HasField("chunk"):
                streams.setdefault(answer.session_id, []).extend(answer.chunk.choices[0].token_ids)
            if answer.HasField("end"):
                assert answer.end.code == grpc.StatusCode.OK.value[0]
                streams.setdefault(answer.session_id, []).append("end")
    return streams


async def test_a_session_with_an_answer_in_the_next_message_sends_its_later_tokens_as_answers() -> None:
    packed: list[bool] = []
    written: list[worker_pb2.GenerateManyResponse] = []

    async def body(context: SessionContext) -> AsyncIterator[worker_pb2.GenerateResponse]:
        packed.append(context.emit_token(5))  # packed
        context.emit(_fill(6, logprobs=True))  # an answer (it has a logprob)
        packed.append(context.emit_token(7))  # refused: it must not overtake the answer above
        context.emit(_fill(7))
        await _until(lambda: len(written) == 1)  # the writer sent those
        packed.append(context.emit_token(8))  # a new message: packed again
        for chunk in ():
            yield chunk

    await _serve(body, accepts_packed_tokens=True, written=written)
    assert packed == [True, False, True]
    first = written[0]
    assert list(first.token_sessions) == [1] and list(first.token_ids) == [5]
    assert [list(a.chunk.choices[0].token_ids) for a in first.responses] == [[6], [7]]
    assert first.responses[0].chunk.choices[0].logprobs[0].logprob == -0.25
    assert _session_streams(written) == {1: [5, 6, 7, 8, "end"]}


async def test_sessions_pack_their_tokens_in_order_beside_each_other() -> None:
    async def body(context: SessionContext) -> AsyncIterator[worker_pb2.GenerateResponse]:
        for token_id in (10, 11, 12):
            assert context.emit_token(token_id)
            await asyncio.sleep(0)
        for chunk in ():
            yield chunk

    written = await _serve(body, accepts_packed_tokens=True, session_ids=(1, 2, 3))
    assert _session_streams(written) == {sid: [10, 11, 12, "end"] for sid in (1, 2, 3)}
    assert sum(len(m.token_ids) for m in written) == 9


async def test_a_stream_that_did_not_accept_packed_tokens_gets_none() -> None:
    """An older caller (it never set accepts_packed_tokens) reads every chunk as an answer."""
    refused: list[bool] = []

    async def body(context: SessionContext) -> AsyncIterator[worker_pb2.GenerateResponse]:
        for token_id in (5, 6):
            if not context.emit_token(token_id):
                refused.append(True)
                context.emit(_fill(token_id))
            await asyncio.sleep(0)
        for chunk in ():
            yield chunk

    written = await _serve(body, accepts_packed_tokens=False)
    assert refused == [True, True]
    assert not any(m.token_sessions or m.token_ids for m in written)
    assert _session_streams(written) == {1: [5, 6, "end"]}


async def test_a_cancelled_sessions_tokens_are_dropped() -> None:
    written: list[worker_pb2.GenerateManyResponse] = []
    contexts: list[SessionContext] = []
    cancel = asyncio.Event()

    async def write(message: worker_pb2.GenerateManyResponse) -> None:
        written.append(message)

    async def generate(
        request: worker_pb2.GenerateRequest, context: SessionContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        contexts.append(context)
        assert context.emit_token(5)
        await asyncio.Event().wait()  # until cancelled
        yield worker_pb2.GenerateResponse()

    async def requests() -> AsyncIterator[worker_pb2.GenerateManyRequest]:
        yield worker_pb2.GenerateManyRequest(requests=[_start(1), _start(2)], accepts_packed_tokens=True)
        await cancel.wait()
        yield worker_pb2.GenerateManyRequest(
            requests=[worker_pb2.GenerateSessionRequest(session_id=1, cancel=True)]
        )
        await asyncio.Event().wait()  # the caller keeps the stream open

    mux = GenerateMux(generate, write)
    serving = asyncio.create_task(mux.serve(requests()))
    await _until(lambda: len(contexts) == 2 and sum(len(m.token_ids) for m in written) == 2)
    cancel.set()
    await _until(lambda: mux.num_sessions == 1)
    # the engine step's callback may still hand the cancelled session a token: dropped
    assert contexts[0].emit_token(6)
    assert contexts[1].emit_token(7)
    await _until(lambda: sum(len(m.token_ids) for m in written) == 3)
    serving.cancel()
    packed = [(s, t) for m in written for s, t in zip(m.token_sessions, m.token_ids, strict=True)]
    assert sorted(packed) == [(1, 5), (2, 5), (2, 7)]
    assert mux.tokens_packed == 3 and mux.chunks_emitted == 3
