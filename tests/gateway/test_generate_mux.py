"""The gateway's Generate calls over one GenerateMany stream, against a real worker server
(stories260K on the CPU, in this process, on a unix socket): concurrent sessions stream exactly
the tokens of their own Generate rpcs, in fewer messages than chunks; cancelling one session
aborts its request only; a bad request ends its own session with the status its rpc gets; a
worker that goes away fails every session with its rpc's status, and the next call opens a new
stream; a draining worker refuses new sessions as its server refuses new rpcs. Packed tokens: the
worker sends a mid-stream chunk of one token of the first choice packed, only to a caller that
accepts them, and the gateway reads them as the chunks they stand for, before the message's
answers, dropping those of sessions it no longer holds."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway import deadline
from gateway.clients import WorkerClient, _generate_chunk
from gateway.downstream import ChoiceDelta, GenerateChunk, Guided
from gateway.worker_stream import WORKER_GONE, WORKER_STOPPED
from services.common import switches
from services.common.metrics import RPC_ERRORS
from services.common.sampling import SamplingParams
from services.common.server import GrpcServer
from services.worker.async_engine import AsyncEngine
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.outputs import ChoiceOutput, RequestOutput
from services.worker.rpc import SERVICE_NAME, WorkerServicer, _HandlerCapture, add_to_server, fill_output_pb
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

COMMON: dict[str, Any] = dict(device="cpu", kv_cache_memory="16MiB", max_model_len=512, cpu_threads=1)
PROMPT = (1, 403, 251, 263, 93, 291)


class Worker:
    """A worker server in this process, which can be stopped (as a crash ends its connections)."""

    def __init__(self, model: Path, socket: Path) -> None:
        self.config = WorkerConfig(address=f"unix:{socket}", model=str(model), **COMMON)
        self.engine = Engine(self.config)
        self.async_engine = AsyncEngine(self.engine)
        self.async_engine.start()
        self.server: GrpcServer | None = None
        self.servicer: WorkerServicer | None = None

    @property
    def address(self) -> str:
        return self.config.address

    async def start(self) -> None:
        self.server = GrpcServer(self.address, grace_s=5.0)
        self.servicer = add_to_server(self.server.server, self.async_engine)
        self.server.add_service_name(SERVICE_NAME)
        await self.server.start()

    async def kill(self) -> None:
        assert self.server is not None and self.servicer is not None
        await self.server.server.stop(0)
        await self.servicer.close()

    def close(self) -> None:
        self.async_engine.stop()


@pytest.fixture
async def worker(stories_dir: Path, tmp_path: Path) -> AsyncIterator[Worker]:
    w = Worker(stories_dir, tmp_path / "worker.sock")
    await w.start()
    yield w
    if w.server is not None:
        await w.server.server.stop(0)
    w.close()


@pytest.fixture
async def mux(worker: Worker) -> AsyncIterator[WorkerClient]:
    c = WorkerClient(worker.address, generate_mux=True)
    yield c
    await c.close()


@pytest.fixture
async def rpc(worker: Worker) -> AsyncIterator[WorkerClient]:
    c = WorkerClient(worker.address, generate_mux=False)
    yield c
    await c.close()


@dataclass
class Result:
    tokens: dict[int, list[int]]
    finish: dict[int, str | None]
    logprobs: list[float]
    usage: tuple[int, int] | None


async def _run(client: WorkerClient, request_id: str, sampling: SamplingParams[Guided], **kw: Any) -> Result:
    result = Result({}, {}, [], None)
    async for chunk in client.generate(request_id, kw.pop("prompt", PROMPT), sampling, **kw):
        _note(result, chunk)
    return result


def _note(result: Result, chunk: GenerateChunk) -> None:
    for c in chunk.choices:
        result.tokens.setdefault(c.index, []).extend(c.token_ids)
        result.logprobs.extend(lp.logprob for lp in c.logprobs)
        if c.finish_reason is not None:
            result.finish[c.index] = c.finish_reason
    if chunk.usage is not None:
        result.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)


def _sampling(i: int) -> SamplingParams[Guided]:
    kinds: list[SamplingParams[Guided]] = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=17),
        SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=20, n=2, logprobs=2),
        SamplingParams(temperature=1.0, seed=i, max_tokens=30, stop_token_ids=(13,)),
    ]
    return kinds[i % len(kinds)]


async def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _stand_in_worker(
    socket: Path, generate_many: Callable[..., Any], generate: Callable[..., Any] | None = None
) -> tuple[grpc.aio.Server, str]:
    """A started gRPC server on a unix socket answering the Worker service's GenerateMany (and
    Generate) with the given handlers: a worker that misbehaves in a chosen way. (server, address)"""
    handlers = {
        "GenerateMany": grpc.stream_stream_rpc_method_handler(
            generate_many,
            request_deserializer=worker_pb2.GenerateManyRequest.FromString,
            response_serializer=worker_pb2.GenerateManyResponse.SerializeToString,
        ),
    }
    if generate is not None:
        handlers["Generate"] = grpc.unary_stream_rpc_method_handler(
            generate,
            request_deserializer=worker_pb2.GenerateRequest.FromString,
            response_serializer=worker_pb2.GenerateResponse.SerializeToString,
        )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    address = f"unix:{socket}"
    server.add_insecure_port(address)
    await server.start()
    return server, address


async def test_concurrent_sessions_stream_the_tokens_of_their_own_rpcs(
    mux: WorkerClient, rpc: WorkerClient, worker: Worker
) -> None:
    n = 32
    over_mux = await asyncio.gather(*(_run(mux, f"m{i}", _sampling(i)) for i in range(n)))
    over_rpc = await asyncio.gather(*(_run(rpc, f"r{i}", _sampling(i)) for i in range(n)))
    assert [r.tokens for r in over_mux] == [r.tokens for r in over_rpc]
    assert [r.finish for r in over_mux] == [r.finish for r in over_rpc]
    assert [r.usage for r in over_mux] == [r.usage for r in over_rpc]
    for a, b in zip(over_mux, over_rpc, strict=True):
        # the two runs batch the 32 requests differently, and a row's fp32 logits depend on the
        # batch it was computed in (the CPU GEMM's blocking) at the 1e-6 level: within 1e-4, as
        # every logprob comparison between runs (a flake at approx's default 1e-6 relative)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert len({tuple(r.tokens[0]) for r in over_mux}) > n // 2  # the seeds really differ
    counts = mux.generate_counts
    tokens = sum(len(ids) for r in over_mux for ids in r.tokens.values())
    # every session's chunks and end came back, and far fewer messages carried them than chunks
    assert counts.session_messages_received >= tokens // 2
    assert counts.messages_received < counts.session_messages_received / 4, counts
    assert counts.messages_sent <= n + 1  # one start each at most (they batch when they queue)
    assert rpc.generate_counts.messages_received == 0  # (the rpc client never used a stream)
    # most mid-stream chunks went out from the engine step's callback, without waking their
    # session's task (rpc.py's `take`); a session's first and last chunks come from its task
    assert worker.servicer is not None
    assert worker.servicer.num_chunks_emitted() > counts.session_messages_received / 2, counts
    # and most of those went packed (the sessions with n = 2 or logprobs never do)
    assert worker.servicer.num_tokens_packed() > counts.session_messages_received / 4, counts


async def test_sessions_without_the_sink_stream_the_same_tokens(
    mux: WorkerClient, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TANDEM_GENERATE_SINK=0 (the A/B baseline): every chunk goes out from its session's task."""
    n = 8
    with_sink = await asyncio.gather(*(_run(mux, f"s{i}", _sampling(i)) for i in range(n)))
    assert worker.servicer is not None
    emitted = worker.servicer.num_chunks_emitted()
    monkeypatch.setitem(switches.GENERATE_SINK.__dict__, "value", False)  # (the cached value)
    without = await asyncio.gather(*(_run(mux, f"t{i}", _sampling(i)) for i in range(n)))
    assert [r.tokens for r in without] == [r.tokens for r in with_sink]
    assert [r.finish for r in without] == [r.finish for r in with_sink]
    assert worker.servicer.num_chunks_emitted() == emitted  # none from the step's callback


async def test_without_packed_tokens_the_sessions_stream_the_same_tokens(
    mux: WorkerClient, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TANDEM_PACKED_TOKENS=0 (the A/B baseline): a stream whose gateway never set
    accepts_packed_tokens gets every chunk as a session response, with the same tokens."""
    n = 8
    packed = await asyncio.gather(*(_run(mux, f"p{i}", _sampling(i)) for i in range(n)))
    assert worker.servicer is not None
    num_packed = worker.servicer.num_tokens_packed()
    assert num_packed > 0
    monkeypatch.setitem(switches.PACKED_TOKENS.__dict__, "value", False)  # (the cached value)
    plain = WorkerClient(worker.address, generate_mux=True)  # a new stream (packing is per stream)
    try:
        unpacked = await asyncio.gather(*(_run(plain, f"u{i}", _sampling(i)) for i in range(n)))
    finally:
        await plain.close()
    assert [r.tokens for r in unpacked] == [r.tokens for r in packed]
    assert [r.finish for r in unpacked] == [r.finish for r in packed]
    assert worker.servicer.num_tokens_packed() == num_packed  # none packed on the new stream


async def test_cancelling_a_session_aborts_its_request_only(mux: WorkerClient, worker: Worker) -> None:
    long = SamplingParams[Guided](temperature=1.0, seed=1, max_tokens=400, ignore_eos=True)
    streams = [mux.generate(f"long{i}", PROMPT, long) for i in range(3)]
    firsts = [await s.__anext__() for s in streams]  # each request is running on the worker
    assert all(f.choices for f in firsts)
    assert worker.engine.num_running == 3
    await streams[1].aclose()  # the client went away
    await _wait_for(lambda: worker.engine.num_running == 2)
    rest = []
    for s in (streams[0], streams[2]):
        result = Result({}, {}, [], None)
        async for chunk in s:
            _note(result, chunk)
        rest.append(result)
    got = [len(firsts[i].choices[0].token_ids) + len(r.tokens[0]) for i, r in zip((0, 2), rest, strict=True)]
    assert got == [400, 400]
    assert all(r.finish == {0: "length"} for r in rest)
    await _wait_for(lambda: worker.engine.num_running == 0 and worker.servicer is not None)
    assert worker.servicer is not None and worker.servicer.num_generate_sessions() == 0


async def test_a_bad_request_ends_its_session_with_the_status_of_its_rpc(
    mux: WorkerClient, rpc: WorkerClient
) -> None:
    good = SamplingParams[Guided](temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    bad_cases: list[dict[str, Any]] = [
        {"prompt": ()},  # an empty prompt
        {"prompt": (1, 10**6)},  # a token id past the vocabulary
        {"lora_name": "no-such-adapter"},
        {"sampling": SamplingParams[Guided](guided=Guided("regex", "a{1000000}"), max_tokens=4)},
    ]

    async def fails(client: WorkerClient, case: dict[str, Any]) -> grpc.aio.AioRpcError:
        case = dict(case)
        sampling = case.pop("sampling", good)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _run(client, "bad", sampling, **case)
        return info.value

    def errors(code: grpc.StatusCode) -> float:
        labels = {"method": "Worker/Generate", "code": code.name}
        return REGISTRY.get_sample_value(RPC_ERRORS, labels) or 0.0

    for case in bad_cases:
        goods = [asyncio.create_task(_run(mux, f"g{i}", good)) for i in range(4)]
        over_mux = await fails(mux, case)
        counted = errors(over_mux.code())
        over_rpc = await fails(rpc, case)
        assert (over_mux.code(), over_mux.details()) == (over_rpc.code(), over_rpc.details()), case
        # the worker counts the session's error as it counts the rpc's (an rpc of Worker/Generate)
        await _wait_for(functools.partial(lambda c, n: errors(c) > n, over_rpc.code(), counted))
        assert counted >= 1 and errors(over_rpc.code()) == counted + 1
        assert over_mux.code() not in WORKER_GONE | WORKER_STOPPED, case
        assert [len((await g).tokens[0]) for g in goods] == [40] * 4


async def test_a_worker_that_goes_away_fails_every_session_as_it_fails_their_rpcs(
    stories_dir: Path, tmp_path: Path
) -> None:
    long = SamplingParams[Guided](temperature=1.0, seed=2, max_tokens=480, ignore_eos=True)
    errors: dict[bool, set[grpc.StatusCode]] = {}
    for use_mux in (True, False):
        worker = Worker(stories_dir, tmp_path / f"w{use_mux}.sock")
        await worker.start()
        client = WorkerClient(worker.address, generate_mux=use_mux)
        streams = [client.generate(f"k{i}", PROMPT, long) for i in range(4)]
        for s in streams:
            await s.__anext__()
        await worker.kill()
        codes = set()
        for s in streams:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in s:
                    pass
            codes.add(info.value.code())
        errors[use_mux] = codes
        if use_mux:
            # the next call opens a new stream to the restarted worker
            await worker.start()
            result = await _run(client, "after", SamplingParams(temperature=0.0, max_tokens=8))
            assert len(result.tokens[0]) == 8
            await worker.kill()
        await client.close()
        worker.close()
    assert errors[True] == errors[False]
    assert errors[True] <= WORKER_GONE | WORKER_STOPPED  # the router moves these requests elsewhere


async def test_a_draining_worker_refuses_new_sessions_and_ends_the_stream_after_its_last(
    mux: WorkerClient, worker: Worker
) -> None:
    assert worker.servicer is not None and worker.server is not None
    sampling = SamplingParams[Guided](temperature=1.0, seed=4, max_tokens=60, ignore_eos=True)
    running = mux.generate("before", PROMPT, sampling)
    first = await running.__anext__()
    worker.server.drain.start()  # what GrpcServer.stop does first: new rpcs are refused
    await worker.servicer.drain()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _run(mux, "after", sampling)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (info.value.details() or "")
    result = Result({}, {}, [], None)
    async for chunk in running:
        _note(result, chunk)
    assert len(first.choices[0].token_ids) + len(result.tokens[0]) == 60
    await _wait_for(lambda: worker.server is not None and worker.server.drain.in_flight == 0)


async def test_a_worker_without_generate_many_gets_one_rpc_per_request(
    stories_dir: Path, tmp_path: Path
) -> None:
    """A worker of an older version (no GenerateMany: UNIMPLEMENTED) still serves every request."""
    worker = Worker(stories_dir, tmp_path / "old.sock")
    server = GrpcServer(worker.address, grace_s=1.0)
    servicer = WorkerServicer(worker.async_engine)
    capture = _HandlerCapture()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, capture)
    del capture.handlers["GenerateMany"]
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, capture.handlers),)
    )
    await server.start()
    client = WorkerClient(worker.address, generate_mux=True)
    try:
        results = await asyncio.gather(*(_run(client, f"o{i}", _sampling(i)) for i in range(4)))
        assert [len(r.tokens[0]) for r in results] == [24, 17, 20, len(results[3].tokens[0])]
        assert not client.uses_generate_mux()
    finally:
        await client.close()
        await server.server.stop(0)
        await servicer.close()
        worker.close()


async def test_a_sessions_deadline_ends_it_and_frees_its_request(mux: WorkerClient, worker: Worker) -> None:
    """The request's deadline ends its session with DEADLINE_EXCEEDED (as it ends a Generate
    rpc), the worker drops the request, and the stream serves the next call."""
    long = SamplingParams[Guided](temperature=1.0, seed=5, max_tokens=480, ignore_eos=True)

    async def with_deadline() -> None:
        deadline.start(0.1)
        await _run(mux, "late", long)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.create_task(with_deadline())  # (a task: the deadline stays in its context)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_for(lambda: worker.engine.num_running == 0 and worker.engine.num_waiting == 0)
    result = await _run(mux, "next", SamplingParams(temperature=0.0, max_tokens=8))
    assert len(result.tokens[0]) == 8


async def test_a_stream_past_its_age_takes_no_new_session_and_ends_after_its_last(
    mux: WorkerClient, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call past the stream's age opens a new stream (a per-rpc balancer places it anew);
    the old one half-closes once its sessions are done and the worker ends it cleanly."""
    monkeypatch.setattr("gateway.session_mux.MAX_STREAM_AGE_S", 0.0)

    def ended_ok() -> float:
        labels = {"method": "Worker/GenerateMany", "code": "OK"}
        return REGISTRY.get_sample_value("tandem:rpcs_total", labels) or 0.0

    before = ended_ok()
    for i in range(3):
        result = await _run(mux, f"age{i}", SamplingParams(temperature=0.0, max_tokens=4))
        assert len(result.tokens[0]) == 4
    await _wait_for(lambda: ended_ok() == before + 2)  # the first two streams, retired
    assert worker.servicer is not None and len(worker.servicer._muxes) == 1


async def test_a_stream_the_worker_breaks_fails_its_sessions_as_a_worker_gone(tmp_path: Path) -> None:
    """grpc reports a connection torn down under an open stream as UNKNOWN "Stream removed" as
    well as UNAVAILABLE (grpc/grpc#34076). The sessions of a GenerateMany stream that fails with
    UNKNOWN or INTERNAL fail with UNAVAILABLE (the router moves them), while a session the worker
    itself ends with INTERNAL keeps it (that request's 500); a Generate rpc that fails with UNKNOWN
    "Stream removed" fails with UNAVAILABLE, with any other UNKNOWN as it came. A grpc server
    stands in for the worker: its GenerateMany ends the session of request "own" with INTERNAL and
    breaks the stream at any other; its Generate fails with the status and details given."""
    broke_with: list[tuple[grpc.StatusCode, str]] = []

    async def generate_many(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in requests:
            for r in message.requests:
                if r.start.request.request_id == "own":
                    end = worker_pb2.GenerateSessionEnd(code=grpc.StatusCode.INTERNAL.value[0], message="own")
                    answer = worker_pb2.GenerateSessionResponse(session_id=r.session_id, end=end)
                    yield worker_pb2.GenerateManyResponse(responses=[answer])
                else:
                    await context.abort(*broke_with[-1])

    async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(*broke_with[-1])
        yield  # (a stream handler)

    server, address = await _stand_in_worker(tmp_path / "broken.sock", generate_many, generate)
    mux = WorkerClient(address, generate_mux=True)
    rpc = WorkerClient(address, generate_mux=False)
    sampling = SamplingParams[Guided](temperature=0.0, max_tokens=4)

    async def fails(client: WorkerClient, request_id: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _run(client, request_id, sampling)
        return info.value

    try:
        for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            broke_with.append((code, "Stream removed"))
            own = await fails(mux, "own")
            assert own.code() == grpc.StatusCode.INTERNAL and own.details() == "own"
            broken = await fails(mux, "broken")
            assert broken.code() == grpc.StatusCode.UNAVAILABLE and broken.code() in WORKER_GONE
            assert f"{code.name}: Stream removed" in (broken.details() or "")
        broke_with.append((grpc.StatusCode.UNKNOWN, "Stream removed"))
        assert (await fails(rpc, "rpc")).code() == grpc.StatusCode.UNAVAILABLE
        broke_with.append((grpc.StatusCode.UNKNOWN, "a bug"))
        assert (await fails(rpc, "rpc")).code() == grpc.StatusCode.UNKNOWN
    finally:
        await mux.close()
        await rpc.close()
        await server.stop(0)


# ---- packed tokens ------------------------------------------------------------------------------

# (first_choice_index, sampling): a chat request's prompt, a batch's fourth prompt, one with
# logprobs (never packed), n = 2, one that ends on a stop token id
PACKED_CASES: list[tuple[int, common_pb2.SamplingParams]] = [
    (0, common_pb2.SamplingParams(temperature=1.0, seed=1, max_tokens=24, ignore_eos=True)),
    (3, common_pb2.SamplingParams(temperature=1.0, seed=2, max_tokens=24, ignore_eos=True)),
    (0, common_pb2.SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, logprobs=1)),
    (4, common_pb2.SamplingParams(temperature=1.0, seed=4, max_tokens=20, ignore_eos=True, n=2)),
    (0, common_pb2.SamplingParams(temperature=1.0, seed=5, max_tokens=40, stop_token_ids=[13])),
]


def _packed_request(i: int) -> worker_pb2.GenerateRequest:
    first, sampling = PACKED_CASES[i % len(PACKED_CASES)]
    return worker_pb2.GenerateRequest(
        request_id=f"p{i}", prompt_token_ids=PROMPT, sampling=sampling, first_choice_index=first
    )


async def test_the_worker_packs_mid_stream_single_tokens_for_a_caller_that_accepts_them(
    worker: Worker,
) -> None:
    """Raw GenerateMany streams against the real worker, with and without accepts_packed_tokens:
    read by the contract, both give every session the tokens of its own Generate rpc; only the
    first carries packed tokens, never for a session with logprobs, and every session's last chunk
    (finish reason, usage) is an answer."""
    n = 15
    requests = [_packed_request(i) for i in range(n)]
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)

        async def by_rpc(request: worker_pb2.GenerateRequest) -> dict[int, list[int]]:
            tokens: dict[int, list[int]] = {}
            async for chunk in stub.Generate(request):
                for c in chunk.choices:
                    tokens.setdefault(c.index, []).extend(c.token_ids)
            return tokens

        async def by_stream(accepts: bool) -> tuple[list[dict[int, list[int]]], list[int], list[bool]]:
            """Each session's tokens by choice, the sessions of the packed tokens, and whether
            each session's last answer had a chunk with usage."""
            tokens: list[dict[int, list[int]]] = [{} for _ in range(n)]
            packed_sessions: list[int] = []
            last_has_usage = [False] * n
            call = stub.GenerateMany()
            starts = [
                worker_pb2.GenerateSessionRequest(
                    session_id=i, start=worker_pb2.GenerateSessionStart(request=request)
                )
                for i, request in enumerate(requests)
            ]
            await call.write(worker_pb2.GenerateManyRequest(requests=starts, accepts_packed_tokens=accepts))
            await call.done_writing()
            async for message in call:
                for sid, token_id in zip(message.token_sessions, message.token_ids, strict=True):
                    packed_sessions.append(sid)
                    tokens[sid].setdefault(requests[sid].first_choice_index, []).append(token_id)
                for answer in message.responses:
                    for c in answer.chunk.choices:
                        tokens[answer.session_id].setdefault(c.index, []).extend(c.token_ids)
                    if answer.HasField("end"):
                        assert answer.end.code == 0, answer.end.message
                    if answer.HasField("chunk"):
                        last_has_usage[answer.session_id] = answer.chunk.HasField("usage")
            return tokens, packed_sessions, last_has_usage

        expected = list(await asyncio.gather(*(by_rpc(r) for r in requests)))
        packed, packed_sessions, packed_last = await by_stream(True)
        plain, plain_sessions, plain_last = await by_stream(False)
    assert packed == expected and plain == expected
    assert plain_sessions == []  # an older caller: every chunk an answer
    assert len(packed_sessions) > n * 8
    assert {sid % len(PACKED_CASES) for sid in packed_sessions} >= {0, 1, 4}
    assert not any(sid % len(PACKED_CASES) == 2 for sid in packed_sessions)  # logprobs: answers
    assert all(packed_last) and all(plain_last)  # the last chunk (usage) is an answer


def test_a_packed_token_stands_for_the_chunk_the_worker_would_send() -> None:
    """The proto's contract on both sides: what the gateway makes of a packed token is what it
    makes of the GenerateResponse the worker builds for that output."""
    out = RequestOutput("r", (ChoiceOutput(3, (42,), None),))
    chunk = fill_output_pb(worker_pb2.GenerateResponse(), out)
    assert chunk == worker_pb2.GenerateResponse(
        request_id="r", choices=[worker_pb2.ChoiceDelta(index=3, token_ids=[42])]
    )
    assert _generate_chunk(chunk) == GenerateChunk((ChoiceDelta(3, (42,), (), None),))


async def test_the_gateway_reads_packed_tokens_before_the_answers_and_drops_a_cancelled_sessions(
    tmp_path: Path,
) -> None:
    """A stand-in worker answers, once the gateway cancelled one of two sessions, one message:
    packed tokens of the kept session, of the cancelled one and of an unknown one, then an answer
    of the kept session (its last chunk and end) and the cancelled one's end. The kept session
    yields its packed tokens (its first_choice_index's choice), then the answer's chunk; the
    others' are dropped."""
    starts: dict[str, int] = {}  # request id -> session id
    flags: list[bool] = []
    cancelled = asyncio.Event()

    async def generate_many(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in requests:
            flags.append(message.accepts_packed_tokens)
            for r in message.requests:
                if r.WhichOneof("kind") == "start":
                    starts[r.start.request.request_id] = r.session_id
                elif r.cancel:
                    cancelled.set()
            if cancelled.is_set() and "keep" in starts:
                break
        keep, gone = starts["keep"], starts["gone"]
        last = worker_pb2.GenerateResponse(
            request_id="keep",
            choices=[
                worker_pb2.ChoiceDelta(index=2, token_ids=[14], finish_reason=common_pb2.FINISH_REASON_LENGTH)
            ],
            usage=common_pb2.Usage(prompt_tokens=6, completion_tokens=3),
        )
        yield worker_pb2.GenerateManyResponse(
            token_sessions=[keep, gone, keep, 999],
            token_ids=[10, 11, 12, 13],
            responses=[
                worker_pb2.GenerateSessionResponse(
                    session_id=keep, chunk=last, end=worker_pb2.GenerateSessionEnd()
                ),
                worker_pb2.GenerateSessionResponse(session_id=gone, end=worker_pb2.GenerateSessionEnd()),
            ],
        )
        await asyncio.Event().wait()  # (the stream stays open)

    server, address = await _stand_in_worker(tmp_path / "packed.sock", generate_many)
    client = WorkerClient(address, generate_mux=True)
    sampling = SamplingParams[Guided](temperature=0.0, max_tokens=3)
    try:
        gone = client.generate("gone", PROMPT, sampling)
        waiting = asyncio.create_task(gone.__anext__())
        await _wait_for(lambda: "gone" in starts)
        waiting.cancel()  # the client went away: the session is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiting
        chunks = [c async for c in client.generate("keep", PROMPT, sampling, first_choice_index=2)]
    finally:
        await client.close()
        await server.stop(0)
    assert flags and all(flags)  # the gateway accepts packed tokens on every message
    assert [(c.choices[0].index, c.choices[0].token_ids, c.choices[0].finish_reason) for c in chunks] == [
        (2, (10,), None),
        (2, (12,), None),
        (2, (14,), "length"),
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    counts = client.generate_counts
    assert counts.messages_received == 1 and counts.session_messages_received == 4 + 2
