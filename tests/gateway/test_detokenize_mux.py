"""The gateway's detokenize sessions over one DetokenizeMany stream, against a real styler:
interleaved sessions answer exactly what a DetokenizeStream of their own answers, a session's
error or cancel touches no other session, a styler restart fails only the sessions in flight, and
deltas that are ready together go out as one message."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from gateway.clients import StylerClient
from gateway.detokenize_mux import DetokenizeSession, _text_delta
from gateway.downstream import DetokenizeStart, TextDelta
from services.common.server import GrpcServer
from services.styler.rpc import SERVICE_NAME, StylerServicer, add_to_server
from tandem.v1 import styler_pb2, styler_pb2_grpc
from tests.styler.helpers import load_styler, shared_dir

QWEN3 = shared_dir() / "tokenizers" / "qwen3"
pytestmark = pytest.mark.skipif(not QWEN3.is_dir(), reason="needs shared/tokenizers/qwen3")

START = DetokenizeStart(
    request_id="r",
    prompt_token_ids=(),
    skip_special_tokens=True,
    stop=(),
    include_stop_str_in_output=False,
    tool_parser="",
    reasoning_parser="",
    num_choices=1,
    first_choice_index=0,
    prompt_opens_reasoning=False,
)

TEXTS = [
    "Plain text with 日本語, emoji 👍🏽 and\nnew lines.",
    "<think>\nLet me see.\n</think>\n\nThe answer is 42. STOP and nothing after",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
    "Short.",
]


class Styler:
    """A styler server in this process on a unix socket, which can be stopped and started again."""

    def __init__(self, socket: Path) -> None:
        self.address = f"unix:{socket}"
        self.server: GrpcServer | None = None
        self.servicer: StylerServicer | None = None
        self.executor = ThreadPoolExecutor(2)

    async def start(self) -> None:
        self.server = GrpcServer(self.address, grace_s=1.0)
        self.servicer = StylerServicer(load_styler(str(QWEN3)), self.executor)
        add_to_server(self.servicer, self.server.server)
        self.server.add_service_name(SERVICE_NAME)
        await self.server.start()

    async def kill(self) -> None:
        """Stop at once, cancelling what runs (as a crash ends the connection)."""
        assert self.server is not None
        await self.server.server.stop(0)


@pytest.fixture
async def styler(tmp_path: Path) -> AsyncIterator[Styler]:
    s = Styler(tmp_path / "styler.sock")
    await s.start()
    yield s
    await s.kill()
    s.executor.shutdown()


@pytest.fixture
async def client(styler: Styler) -> AsyncIterator[StylerClient]:
    c = StylerClient(styler.address)
    yield c
    await c.close()


@dataclass
class Case:
    """One session: its start options and its deltas, in order (choice index, ids, finished)."""

    start: DetokenizeStart
    deltas: list[tuple[int, list[int], bool]]


def _cases(rng: random.Random) -> list[Case]:
    tok = load_styler(str(QWEN3))
    starts = [
        START,
        replace(START, stop=("STOP",), reasoning_parser="auto"),
        replace(START, tool_parser="auto", reasoning_parser="auto"),
        replace(START, stop=("ort",), include_stop_str_in_output=True),
        replace(START, num_choices=2, first_choice_index=4),
    ]
    cases = []
    for i in range(20):
        start = replace(starts[i % len(starts)], request_id=f"r{i}")
        per_choice: list[list[tuple[int, list[int], bool]]] = []
        for index in range(start.first_choice_index, start.first_choice_index + start.num_choices):
            ids = tok.tokenize(TEXTS[(i + index) % len(TEXTS)], False)
            steps = []
            pos = 0
            while pos < len(ids):
                step = rng.choice([1, 1, 1, 3])
                steps.append((index, ids[pos : pos + step], pos + step >= len(ids)))
                pos += step
            per_choice.append(steps)
        deltas = []  # the choices interleaved at random, each choice's own deltas in order
        while any(per_choice):
            deltas.append(rng.choice([c for c in per_choice if c]).pop(0))
        cases.append(Case(start, deltas))
    return cases


async def _reference(address: str, case: Case) -> list[list[TextDelta]]:
    """What the per-request DetokenizeStream answers for `case`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = styler_pb2_grpc.StylerStub(channel)
        start = case.start
        call = stub.DetokenizeStream()
        await call.write(
            styler_pb2.DetokenizeStreamRequest(
                start=styler_pb2.DetokenizeStreamStart(
                    request_id=start.request_id,
                    stop=list(start.stop),
                    include_stop_str_in_output=start.include_stop_str_in_output,
                    tool_parser=start.tool_parser,
                    reasoning_parser=start.reasoning_parser,
                    num_choices=start.num_choices,
                    first_choice_index=start.first_choice_index,
                )
            )
        )
        for index, ids, finished in case.deltas:
            delta = styler_pb2.TokenDelta(index=index, token_ids=ids, finished=finished)
            await call.write(
                styler_pb2.DetokenizeStreamRequest(deltas=styler_pb2.TokenDeltas(deltas=[delta]))
            )
        await call.done_writing()
        return _same_ids([[_text_delta(d) for d in reply.deltas] async for reply in call])


def _same_ids(answers: list[list[TextDelta]]) -> list[list[TextDelta]]:
    """`answers` with each tool call's id (random) replaced by a fixed one."""
    for deltas in answers:
        for d in deltas:
            assert all(c.id.startswith("call_") for c in d.tool_calls)
    return [
        [replace(d, tool_calls=tuple(replace(c, id="call_") for c in d.tool_calls)) for d in deltas]
        for deltas in answers
    ]


async def _collect(session: DetokenizeSession) -> list[list[TextDelta]]:
    return _same_ids([deltas async for deltas in session.responses()])


async def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _run(
    client: StylerClient, cases: Sequence[Case], rng: random.Random
) -> list[list[list[TextDelta]]]:
    """All `cases` at once on the client's stream, their deltas interleaved at random."""
    sessions = [await client.detokenize_stream(c.start) for c in cases]
    readers = [asyncio.create_task(_collect(s)) for s in sessions]
    pending = [list(c.deltas) for c in cases]
    while any(pending):
        i = rng.choice([i for i, p in enumerate(pending) if p])
        await sessions[i].send([pending[i].pop(0)])
        if not pending[i]:
            await sessions[i].done_writing()
        if rng.random() < 0.3:
            await asyncio.sleep(0)  # sometimes let the writer go, so messages hold 1 to many deltas
    return list(await asyncio.gather(*readers))


async def test_interleaved_sessions_answer_what_their_own_streams_answer(
    styler: Styler, client: StylerClient
) -> None:
    rng = random.Random(7)
    cases = _cases(rng)
    got = await _run(client, cases, rng)
    for case, answers in zip(cases, got, strict=True):
        assert answers == await _reference(styler.address, case), case.start
    counts = client.detokenize_counts
    assert counts.messages_sent < counts.session_messages_sent  # some batching happened
    assert styler.servicer is not None and styler.servicer.num_detokenize_sessions() == 0


async def test_forwarded_sessions_hand_over_what_responses_would_yield(
    styler: Styler, client: StylerClient
) -> None:
    """`forward`: a session's answers go to the given function as they arrive, then None at its
    end; a session that ended before `forward` hands over everything it kept, in order, then
    None; a failed session its AioRpcError."""
    rng = random.Random(4)
    cases = _cases(rng)[:4]
    got: list[list[object]] = [[] for _ in cases]
    sessions = [await client.detokenize_stream(c.start) for c in cases]
    for i, session in enumerate(sessions):
        if i % 2 == 0:  # forwarded from the start
            session.forward(got[i].append)
    for case, session in zip(cases, sessions, strict=True):
        for delta in case.deltas:
            await session.send([delta])
        await session.done_writing()
    for i, session in enumerate(sessions):
        if i % 2:  # forwarded only once the session has ended: all it kept
            await _wait_for(lambda s=session: not s._open, "the session's end")
            session.forward(got[i].append)
    await _wait_for(lambda: all(g and g[-1] is None for g in got), "every session's end")
    for case, answers in zip(cases, got, strict=True):
        assert _same_ids(answers[:-1]) == await _reference(styler.address, case)  # type: ignore[arg-type]
    bad = await client.detokenize_stream(replace(START, tool_parser="no-such-parser"))
    failed: list[object] = []
    bad.forward(failed.append)
    await _wait_for(lambda: bool(failed), "the bad session's failure")
    assert isinstance(failed[-1], grpc.aio.AioRpcError)
    assert failed[-1].code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_bad_session_ends_alone(styler: Styler, client: StylerClient) -> None:
    rng = random.Random(1)
    good = _cases(rng)[:3]
    tok = load_styler(str(QWEN3))
    ids = tok.tokenize("Hello there", False)
    bad_starts = {
        "start.prompt_token_ids": replace(START, prompt_token_ids=(1, 10**9)),
        "start.tool_parser": replace(START, tool_parser="no-such-parser"),
    }
    bad = {field: await client.detokenize_stream(start) for field, start in bad_starts.items()}
    bad_index = await client.detokenize_stream(START)
    await bad_index.send([(5, ids, False)])  # outside the session's choices
    got = await _run(client, good, rng)
    for field, session in [*bad.items(), ("deltas[].index 5", bad_index)]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _collect(session)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (exc.value.details() or ""), exc.value.details()
        with pytest.raises(grpc.aio.AioRpcError):  # and a send after it says why
            await session.send([(0, ids, True)])
    for case, answers in zip(good, got, strict=True):
        assert answers == await _reference(styler.address, case)
    mux = client._mux
    after = await _run(client, good, rng)  # the stream is still the same, and still works
    assert client._mux is mux and after == got


async def test_a_cancelled_session_ends_alone(styler: Styler, client: StylerClient) -> None:
    rng = random.Random(2)
    cancelled, kept = _cases(rng)[:2]
    a = await client.detokenize_stream(cancelled.start)
    b = await client.detokenize_stream(kept.start)
    reader_b = asyncio.create_task(_collect(b))
    half = len(cancelled.deltas) // 2
    for delta in cancelled.deltas[:half]:
        await a.send([delta])
    a.cancel()
    before_cancel = await _collect(a)  # what arrived before the cancel, then the end
    assert before_cancel == (await _reference(styler.address, cancelled))[: len(before_cancel)]
    for delta in kept.deltas:
        await b.send([delta])
    await b.done_writing()
    assert await reader_b == await _reference(styler.address, kept)
    servicer = styler.servicer
    assert servicer is not None
    await _wait_for(
        lambda: servicer.num_detokenize_sessions() == 0, "the styler to drop the cancelled session"
    )


async def test_a_styler_restart_fails_the_sessions_in_flight_only(
    styler: Styler, client: StylerClient
) -> None:
    rng = random.Random(3)
    cases = _cases(rng)[:4]
    in_flight = [await client.detokenize_stream(c.start) for c in cases]
    for session, case in zip(in_flight, cases, strict=True):
        await session.send([case.deltas[0]])
    await _wait_for(
        lambda: styler.servicer is not None and styler.servicer.num_detokenize_sessions() == len(cases),
        "the sessions to open",
    )
    await styler.kill()
    for session in in_flight:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _collect(session)
        assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc.value

    await styler.start()
    while not await client.healthy():  # as the gateway's health poller takes it back
        await asyncio.sleep(0.05)
    got = await _run(client, cases, rng)
    for case, answers in zip(cases, got, strict=True):
        assert answers == await _reference(styler.address, case)


async def test_deltas_ready_together_go_out_as_one_message(styler: Styler, client: StylerClient) -> None:
    ids = load_styler(str(QWEN3)).tokenize("One two three four five six", False)
    sessions = [await client.detokenize_stream(replace(START, request_id=f"b{i}")) for i in range(32)]
    readers = [asyncio.create_task(_collect(s)) for s in sessions]
    counts = client.detokenize_counts
    await _wait_for(lambda: counts.session_messages_sent == 32, "the starts to go out")
    for i, token_id in enumerate(ids):
        sent = counts.messages_sent
        for s in sessions:  # a burst: every session's delta is queued before the writer runs
            await s.send([(0, [token_id], i == len(ids) - 1)])
        expected = 32 * (i + 2)
        await _wait_for(lambda n=expected: counts.session_messages_sent == n, "the burst to go out")
        assert counts.messages_sent == sent + 1
    for s in sessions:
        await s.done_writing()
    texts = ["".join(d.text for ds in await r for d in ds) for r in readers]
    assert texts == ["One two three four five six"] * 32


async def test_an_old_stream_takes_no_new_sessions_and_ends_after_its_last(
    styler: Styler, client: StylerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its age a stream is left to its sessions and the next session opens a new one (a
    balancer in front of the stylers places it anew)."""
    rng = random.Random(4)
    first, second = _cases(rng)[:2]
    a = await client.detokenize_stream(first.start)
    old = client._mux
    monkeypatch.setattr("gateway.session_mux.MAX_STREAM_AGE_S", 0.0)
    b = await client.detokenize_stream(second.start)
    assert client._mux is not old
    servicer = styler.servicer
    assert servicer is not None
    await _wait_for(lambda: servicer.num_detokenize_streams() == 2, "two streams")
    readers = [asyncio.create_task(_collect(s)) for s in (a, b)]
    for session, case in ((a, first), (b, second)):
        for delta in case.deltas:
            await session.send([delta])
        await session.done_writing()
    assert [await r for r in readers] == [await _reference(styler.address, c) for c in (first, second)]
    # The old stream ended; the new one stays (idle) until the next session retires it.
    await _wait_for(lambda: servicer.num_detokenize_streams() == 1, "the old stream to end")
    assert old is not None and old.closed and not client._mux.closed


async def test_closing_the_client_fails_the_sessions_of_every_stream(
    styler: Styler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also those of a stream past its age (still serving its last sessions): none is left hanging."""
    client = StylerClient(styler.address)
    old = await client.detokenize_stream(START)
    monkeypatch.setattr("gateway.session_mux.MAX_STREAM_AGE_S", 0.0)
    new = await client.detokenize_stream(START)
    servicer = styler.servicer
    assert servicer is not None
    await _wait_for(lambda: servicer.num_detokenize_sessions() == 2, "both sessions to open")
    await client.close()
    for session in (old, new):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(_collect(session), 20)
        assert exc.value.code() == grpc.StatusCode.CANCELLED
