"""DetokenizeMany as a public gRPC client sees it: many sessions on one stream, each answered as
its own DetokenizeStream would be, errors per session, order kept across the thread pool, and a
drain that ends the stream after its last session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.server import GrpcServer
from services.styler.detokenize_work import INLINE_MAX_NEW_TOKENS
from services.styler.rpc import SERVICE_NAME, StylerServicer, add_to_server
from tandem.v1 import styler_pb2, styler_pb2_grpc

from .helpers import load_styler, needs_shared, shared_dir

QWEN3 = shared_dir() / "tokenizers" / "qwen3"
pytestmark = [needs_shared, pytest.mark.skipif(not QWEN3.is_dir(), reason="needs shared/tokenizers/qwen3")]

TEXT = "Several sessions share one stream: 日本語, emoji 👍🏽 and words, " * 4 + "then a STOP string."


@dataclass
class Served:
    stub: styler_pb2_grpc.StylerStub
    servicer: StylerServicer
    channel: grpc.aio.Channel


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server = GrpcServer("127.0.0.1:0", grace_s=1.0)
    with ThreadPoolExecutor(2) as executor:
        servicer = StylerServicer(load_styler(str(QWEN3)), executor)
        add_to_server(servicer, server.server)
        server.add_service_name(SERVICE_NAME)
        await server.start()
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            yield Served(styler_pb2_grpc.StylerStub(channel), servicer, channel)
        await server.stop()


def _start(session_id: int, **fields: object) -> styler_pb2.SessionRequest:
    return styler_pb2.SessionRequest(session_id=session_id, start=styler_pb2.DetokenizeStreamStart(**fields))  # type: ignore[arg-type]


def _deltas(session_id: int, ids: list[int], finished: bool, index: int = 0) -> styler_pb2.SessionRequest:
    delta = styler_pb2.TokenDelta(index=index, token_ids=ids, finished=finished)
    return styler_pb2.SessionRequest(session_id=session_id, deltas=styler_pb2.TokenDeltas(deltas=[delta]))


def _close(session_id: int) -> styler_pb2.SessionRequest:
    return styler_pb2.SessionRequest(session_id=session_id, close=True)


async def _answers(call: grpc.aio.StreamStreamCall, until_ended: set[int]) -> dict[int, list[object]]:
    """Read answers until every session of `until_ended` has ended: per session, its text deltas
    (index, text, stopped, finished, num_tokens) and finally its end (code, message)."""
    out: dict[int, list[object]] = {}
    ended: set[int] = set()
    while not until_ended <= ended:
        reply = await call.read()
        assert reply is not grpc.aio.EOF, (out, ended)
        for answer in reply.responses:
            got = out.setdefault(answer.session_id, [])
            got += [(d.index, d.text, d.stopped, d.finished, d.num_tokens) for d in answer.deltas]
            if answer.HasField("end"):
                got.append((answer.end.code, answer.end.message))
                ended.add(answer.session_id)
    return out


async def _one_stream(
    stub: styler_pb2_grpc.StylerStub, messages: list[styler_pb2.DetokenizeStreamRequest]
) -> list[object]:
    """What DetokenizeStream answers: the same shape as `_answers` for one session, ending OK."""
    out: list[object] = []
    async for reply in stub.DetokenizeStream(iter(messages)):
        out += [(d.index, d.text, d.stopped, d.finished, d.num_tokens) for d in reply.deltas]
    return [*out, (0, "")]


async def test_sessions_in_one_message_and_across_the_pool_keep_their_order(
    served: Served,
) -> None:
    """Session 1 sends a delta large enough for the thread pool, then small ones in the same and
    later messages; session 2 streams one id at a time meanwhile. Each answer equals the session's
    own DetokenizeStream's, and nothing of session 1 overtakes its large delta."""
    stub = served.stub
    ids = load_styler(str(QWEN3)).tokenize(TEXT, False)
    large = INLINE_MAX_NEW_TOKENS + 4
    assert len(ids) > large + 4
    plan: list[list[tuple[int, list[int], bool]]] = [  # messages: (session, ids, finished) each
        [(1, ids[:large], False), (1, ids[large : large + 1], False), (2, ids[:1], False)],
        *[
            [(1, ids[i : i + 1], False), (2, ids[i - large : i - large + 1], False)]
            for i in range(large + 1, len(ids) - 1)
        ],
        [(1, ids[-1:], True), (2, ids[len(ids) - large - 1 :], True)],
    ]
    call = stub.DetokenizeMany()
    starts = [_start(s, stop=["STOP"], request_id=f"s{s}") for s in (1, 2)]
    await call.write(styler_pb2.DetokenizeManyRequest(requests=starts))
    for message in plan:
        await call.write(styler_pb2.DetokenizeManyRequest(requests=[_deltas(s, i, f) for s, i, f in message]))
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_close(1), _close(2)]))
    got = await _answers(call, {1, 2})
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK

    for session in (1, 2):
        sent = [(i, f) for message in plan for s, i, f in message if s == session]
        messages = [styler_pb2.DetokenizeStreamRequest(start=styler_pb2.DetokenizeStreamStart(stop=["STOP"]))]
        messages += [
            styler_pb2.DetokenizeStreamRequest(
                deltas=styler_pb2.TokenDeltas(
                    deltas=[styler_pb2.TokenDelta(index=0, token_ids=i, finished=f)]
                )
            )
            for i, f in sent
        ]
        assert got[session] == await _one_stream(stub, messages), session
    assert "".join(str(t[1]) for t in got[1][:-1]) == TEXT[: TEXT.index("STOP")]


async def test_errors_end_their_session_only(
    served: Served,
) -> None:
    stub, servicer = served.stub, served.servicer
    ids = load_styler(str(QWEN3)).tokenize("Hello there", False)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    call = stub.DetokenizeMany()
    await call.write(
        styler_pb2.DetokenizeManyRequest(
            requests=[
                _start(1),
                _start(2, prompt_token_ids=[1, 10**9]),
                _deltas(3, ids, False),  # no start
                _start(4),
                _start(4),  # twice
                _start(5),
                _deltas(5, ids, False, index=7),  # a choice the session does not have
                _start(6, tool_parser="nope"),
                _deltas(1, ids, True),
                _close(1),
            ]
        )
    )
    got = await _answers(call, {1, 2, 3, 4, 5, 6})
    assert got[1][-1] == (0, "")
    assert "".join(str(t[1]) for t in got[1][:-1]) == "Hello there"
    errors = {s: got[s][-1] for s in (2, 3, 4, 5, 6)}
    assert all(code == invalid for code, _ in errors.values()), errors  # type: ignore[misc]
    assert str(errors[2][1]).startswith("start.prompt_token_ids")  # type: ignore[index]
    assert "must be `start`" in str(errors[3][1])  # type: ignore[index]
    assert "may only be sent once" in str(errors[4][1])  # type: ignore[index]
    assert str(errors[5][1]).startswith("deltas[].index 7")  # type: ignore[index]
    assert "start.tool_parser" in str(errors[6][1])  # type: ignore[index]
    assert servicer.num_detokenize_sessions() == 0

    # The stream goes on: a new session works.
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_start(7), _deltas(7, ids, True), _close(7)]))
    got = await _answers(call, {7})
    assert "".join(str(t[1]) for t in got[7][:-1]) == "Hello there" and got[7][-1] == (0, "")
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_cancel_drops_a_session_without_an_answer(
    served: Served,
) -> None:
    stub, servicer = served.stub, served.servicer
    ids = load_styler(str(QWEN3)).tokenize("Hello there", False)
    call = stub.DetokenizeMany()
    cancel = styler_pb2.SessionRequest(session_id=1, cancel=True)
    await call.write(
        styler_pb2.DetokenizeManyRequest(requests=[_start(1), _start(2), _deltas(1, ids[:1], False), cancel])
    )
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_deltas(2, ids, True), _close(2)]))
    got = await _answers(call, {2})
    assert "".join(str(t[1]) for t in got[2][:-1]) == "Hello there" and got[2][-1] == (0, "")
    assert all(len(t) == 5 for t in got.get(1, [])), got[1]  # text deltas maybe, but no end
    assert servicer.num_detokenize_sessions() == 0
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_a_drain_refuses_new_sessions_and_ends_the_stream_after_the_last(
    served: Served,
) -> None:
    stub, servicer = served.stub, served.servicer
    ids = load_styler(str(QWEN3)).tokenize("Hello there", False)
    call = stub.DetokenizeMany()
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_start(1), _deltas(1, ids[:1], False)]))
    while servicer.num_detokenize_sessions() != 1:
        await asyncio.sleep(0.01)
    await servicer.drain()
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_start(2), _deltas(1, ids[1:], True)]))
    got = await _answers(call, {2})
    assert got[2] == [
        (grpc.StatusCode.UNAVAILABLE.value[0], "the styler is draining; retry on another replica")
    ]
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_close(1)]))
    for session, answers in (await _answers(call, {1})).items():
        got.setdefault(session, []).extend(answers)
    assert "".join(str(t[1]) for t in got[1][:-1]) == "Hello there" and got[1][-1] == (0, "")
    assert await call.read() is grpc.aio.EOF  # the stream ended after its last session
    assert await call.code() == grpc.StatusCode.OK


async def test_garbage_is_invalid_argument(served: Served) -> None:
    """Bytes that are no DetokenizeManyRequest end the stream with INVALID_ARGUMENT, not UNKNOWN."""
    stub, servicer = served.stub, served.servicer
    call = stub.DetokenizeMany()
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_start(1)]))
    while servicer.num_detokenize_sessions() != 1:
        await asyncio.sleep(0.01)
    raw = served.channel.stream_stream(
        "/tandem.v1.Styler/DetokenizeMany", request_serializer=None, response_deserializer=None
    )()
    await raw.write(b"\xff\xff\xff\xff\x0fnot a protobuf message")
    await raw.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in raw:
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in (exc.value.details() or "")
    # The other stream is untouched.
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_close(1)]))
    assert (await _answers(call, {1}))[1] == [(0, "")]


_SESSION_MESSAGES = st.lists(
    st.tuples(
        st.integers(0, 3),  # session id
        st.sampled_from(["start", "deltas", "close", "cancel", ""]),
        st.fixed_dictionaries(
            {
                "num_choices": st.integers(0, 2),
                "first_choice_index": st.integers(0, 2),
                "stop": st.lists(st.text(max_size=3), max_size=2),
                "tool_parser": st.sampled_from(["", "auto", "nope"]),
                "prompt_token_ids": st.lists(st.integers(0, 10**6), max_size=3),
            }
        ),
        st.integers(0, 3),  # choice index
        st.lists(st.integers(0, 200_000), max_size=INLINE_MAX_NEW_TOKENS + 4),  # ids: some to the pool
        st.booleans(),  # finished
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(messages=_SESSION_MESSAGES, batch=st.integers(1, 6))
def test_any_sequence_of_session_messages_leaves_the_stream_serving(
    messages: list[tuple[int, str, dict[str, object], int, list[int], bool]], batch: int
) -> None:
    """Whatever sessions send (no start, start twice, unknown parsers, bad ids and indices, large
    deltas, cancel and close anywhere), each session ends OK or INVALID_ARGUMENT and the stream
    goes on serving a well-formed session."""

    def request(
        session_id: int, kind: str, start: dict[str, object], index: int, ids: list[int], finished: bool
    ) -> styler_pb2.SessionRequest:
        if kind == "start":
            return _start(session_id, **start)
        if kind == "deltas":
            return _deltas(session_id, ids, finished, index)
        if kind in ("close", "cancel"):
            return styler_pb2.SessionRequest(session_id=session_id, **{kind: True})  # type: ignore[arg-type]
        return styler_pb2.SessionRequest(session_id=session_id)

    async def run() -> None:
        server = GrpcServer("127.0.0.1:0", grace_s=1.0)
        with ThreadPoolExecutor(2) as executor:
            add_to_server(StylerServicer(load_styler(str(QWEN3)), executor), server.server)
            await server.start()
            async with grpc.aio.insecure_channel(server.bound_address) as channel:
                call = styler_pb2_grpc.StylerStub(channel).DetokenizeMany()
                requests = [request(*m) for m in messages]
                for i in range(0, len(requests), batch):
                    await call.write(styler_pb2.DetokenizeManyRequest(requests=requests[i : i + batch]))
                ids = load_styler(str(QWEN3)).tokenize("Hello there", False)
                await call.write(
                    styler_pb2.DetokenizeManyRequest(
                        requests=[_start(99), _deltas(99, ids, True), _close(99)]
                    )
                )
                got = await _answers(call, {99})
                assert "".join(str(t[1]) for t in got[99][:-1]) == "Hello there" and got[99][-1] == (0, "")
                ok_or_invalid = {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}
                assert all(
                    t[0] in ok_or_invalid for answers in got.values() for t in answers if len(t) == 2
                ), got
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            await server.stop()

    asyncio.run(run())


async def test_a_closed_session_id_may_be_reused_even_behind_the_pool(served: Served) -> None:
    """A large delta (thread pool), then in the same message close, and start and deltas of a new
    session under the same id: both are answered in order."""
    stub = served.stub
    ids = load_styler(str(QWEN3)).tokenize(TEXT, False)
    large = ids[: INLINE_MAX_NEW_TOKENS + 1]
    short = load_styler(str(QWEN3)).tokenize("Hello there", False)
    call = stub.DetokenizeMany()
    requests = [_start(1), _deltas(1, large, True), _close(1), _start(1), _deltas(1, short, True), _close(1)]
    await call.write(styler_pb2.DetokenizeManyRequest(requests=requests))
    got: list[object] = []
    while got.count((0, "")) < 2:
        reply = await asyncio.wait_for(call.read(), 20)
        for answer in reply.responses:
            got += [d.text for d in answer.deltas]
            if answer.HasField("end"):
                got.append((answer.end.code, answer.end.message))
    load = load_styler(str(QWEN3))
    assert got == [load.detokenize(large), (0, ""), "Hello there", (0, "")]
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_ids_whose_text_is_held_back_are_answered_with_empty_text(served: Served) -> None:
    """Ids that never complete a character (a repeated lone lead byte 0xE4, "ä" in byte-level
    BPE) are answered all the same, per message: empty text and the count of ids taken, inline
    and from the thread pool alike, and DetokenizeStream answers the same. The finish releases the
    full decode."""
    stub = served.stub
    styler = load_styler(str(QWEN3))
    byte = styler.tokenizer.token_to_id("ä")
    assert byte is not None and styler.detokenize([byte]) == "\ufffd"
    large = INLINE_MAX_NEW_TOKENS + 1
    batches = [([byte], False), ([byte] * 2, False), ([byte] * large, False), ([byte], True)]
    call = stub.DetokenizeMany()
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_start(1)]))
    for ids, finished in batches:
        await call.write(styler_pb2.DetokenizeManyRequest(requests=[_deltas(1, ids, finished)]))
    await call.write(styler_pb2.DetokenizeManyRequest(requests=[_close(1)]))
    got = await _answers(call, {1})
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    total = 4 + large
    assert got[1] == [
        (0, "", False, False, 1),
        (0, "", False, False, 3),
        (0, "", False, False, 3 + large),
        (0, "\ufffd" * total, False, True, total),
        (0, ""),
    ]
    assert styler.detokenize([byte] * total) == "\ufffd" * total
    messages = [styler_pb2.DetokenizeStreamRequest(start=styler_pb2.DetokenizeStreamStart())]
    messages += [
        styler_pb2.DetokenizeStreamRequest(
            deltas=styler_pb2.TokenDeltas(deltas=[styler_pb2.TokenDelta(index=0, token_ids=i, finished=f)])
        )
        for i, f in batches
    ]
    assert await _one_stream(stub, messages) == got[1]
