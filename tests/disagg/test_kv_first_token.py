"""The prefill's first token, streamed by the decode worker as soon as it arrives (layer-wise push).

Real worker gRPC servers, in-process on unix sockets: a prefill worker P (32-token prefill chunks)
and a decode worker D. The caller plays the gateway: PrefillStream on P, Generate with the early
handle on D. D's client must get the first token while the rest of the fetch is held back (the
end of P's gRPC stream, or the CUDA IPC chunk that follows `first`, with the CUDA IPC protocol run
in-process on the CPU); the outputs equal a unified worker's (greedy, seeded with logprobs, guided);
a fetch that fails after that token went out (P stopped mid-stream) gives the client the token once
and a continuation equal to the unified run; a first token that ends the choice ends the request at
once; no block or handle is left on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_kv_transfer import wait_no_blocks
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from services.worker import kv_transfer
from services.worker.kv_layerwise import LayerProgress
from services.worker.kv_transfer import KVSource, PrefillDone
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

COMMON = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)
GATE_TIMEOUT_S = 60.0
PROMPT = [1, *range(100, 170)]  # 71 tokens: 3 prefill chunks of P, a partial last block
REGEX = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}\."


def stub(w: InProcessWorker) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))


@pytest.fixture(scope="module")
def workers(
    loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InProcessWorker, InProcessWorker]]:
    """(P, D) of stories260K; both offer the CUDA IPC protocol (in one process, on the CPU, D
    uses P's tensor directly); each test picks D's transport."""
    sock = tmp_path_factory.mktemp("firsttok")
    opts: dict[str, Any] = dict(model=str(stories_dir), **COMMON)
    p = start_worker(loop, sock, "p", role="prefill", max_num_batched_tokens=32, kv_chunk_bytes=2048, **opts)
    d = start_worker(loop, sock, "d", role="decode", **opts)
    for w in (p, d):
        w.servicer.kv_transports = ("cuda-ipc", "grpc")
    yield p, d
    stop_worker(loop, p)
    stop_worker(loop, d)


def sampling(mode: str, max_tokens: int = 10) -> common_pb2.SamplingParams:
    if mode == "greedy":
        return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if mode == "seeded":
        return common_pb2.SamplingParams(
            temperature=1.0, top_k=40, seed=11, max_tokens=max_tokens, logprobs=2
        )
    sp = common_pb2.SamplingParams(temperature=1.0, seed=3, max_tokens=16)
    sp.guided.regex = REGEX
    return sp


def unified(worker: InProcessWorker, rid: str, sp: common_pb2.SamplingParams) -> list[worker_pb2.ChoiceDelta]:
    """The same request computed on one worker (P serves Generate too), as its choice deltas."""
    request = worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=sp)
    return [c for chunk in stub(worker).Generate(request, timeout=60) for c in chunk.choices]


def flatten(deltas: list[worker_pb2.ChoiceDelta]) -> tuple[list[int], list[tuple[int, int, float]]]:
    tokens = [t for c in deltas for t in c.token_ids]
    logprobs = [(lp.token_id, lp.rank, lp.logprob) for c in deltas for lp in c.logprobs]
    return tokens, logprobs


def assert_same(got: list[worker_pb2.ChoiceDelta], expected: list[worker_pb2.ChoiceDelta]) -> None:
    tokens, logprobs = flatten(got)
    ref_tokens, ref_logprobs = flatten(expected)
    assert tokens == ref_tokens
    assert [lp[:2] for lp in logprobs] == [lp[:2] for lp in ref_logprobs]
    assert [lp[2] for lp in logprobs] == pytest.approx([lp[2] for lp in ref_logprobs], abs=1e-4)
    assert [c.finish_reason for c in got if c.finish_reason] == [
        c.finish_reason for c in expected if c.finish_reason
    ]


def assert_usage(stream: DecodeStream, num_tokens: int) -> None:
    """D's usage: the prompt, and the tokens D generated (the prefill's first token is the prefill
    worker's, as a given generated_token_ids is; the gateway counts every token it streams)."""
    usage = stream.chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), num_tokens - 1)


class DecodeStream:
    """D's Generate with a layer-wise kv_source, read on a thread: `first` is set when the first
    chunk with a token arrived (the test asserts when that happens)."""

    def __init__(self, d: InProcessWorker, rid: str, sp: common_pb2.SamplingParams, handle: Any) -> None:
        self.first = threading.Event()
        self.chunks: list[worker_pb2.GenerateResponse] = []
        request = worker_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=PROMPT, sampling=sp, kv_source=handle
        )
        self._pool = ThreadPoolExecutor(1)
        self._done = self._pool.submit(self._read, stub(d), request)

    def _read(self, d: worker_pb2_grpc.WorkerStub, request: worker_pb2.GenerateRequest) -> None:
        for chunk in d.Generate(request, timeout=60):
            self.chunks.append(chunk)
            if any(c.token_ids for c in chunk.choices):
                self.first.set()

    def result(self) -> list[worker_pb2.ChoiceDelta]:
        self._done.result(60)
        self._pool.shutdown()
        return [c for chunk in self.chunks for c in chunk.choices]


def prefill_stream(p: InProcessWorker, rid: str, sp: common_pb2.SamplingParams) -> tuple[Any, Any]:
    call = stub(p).PrefillStream(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=sp), timeout=60
    )
    handle = next(call).handle
    assert handle.layerwise
    return call, handle


def prefill_reply(call: Any) -> worker_pb2.PrefillResponse:
    events = list(call)
    assert len(events) == 1 and events[0].HasField("response")
    return events[0].response


@contextlib.contextmanager
def decode_holds_after_first(d: InProcessWorker) -> Iterator[threading.Event]:
    """D reads P's stream up to `first`, then takes nothing more until the gate is set (the rest
    of the fetch, the end of the stream or the CUDA IPC chunk, is held back)."""
    gate = threading.Event()
    fetch_kv = d.servicer._fetch_kv

    async def held(source: KVSource, skip_tokens: int) -> AsyncIterator[Any]:
        async with contextlib.aclosing(fetch_kv(source, skip_tokens)) as items:
            async for item in items:
                yield item
                if isinstance(item, PrefillDone):
                    await asyncio.to_thread(gate.wait, GATE_TIMEOUT_S)

    d.servicer._fetch_kv = held  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.set()
        d.servicer._fetch_kv = fetch_kv  # type: ignore[method-assign]


@contextlib.contextmanager
def prefill_pauses_after_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A CUDA IPC FetchKV on P sends `first`, then waits for the gate before its CUDA IPC chunk."""
    gate = threading.Event()
    wait_complete = kv_transfer.wait_complete

    async def paused(progress: LayerProgress) -> AsyncIterator[Any]:
        async with contextlib.aclosing(wait_complete(progress)) as items:
            async for item in items:
                yield item
        await asyncio.to_thread(gate.wait, GATE_TIMEOUT_S)

    monkeypatch.setattr(kv_transfer, "wait_complete", paused)
    try:
        yield gate
    finally:
        gate.set()


@pytest.mark.parametrize("transport", ["grpc", "cuda-ipc"])
@pytest.mark.parametrize("mode", ["greedy", "seeded", "guided"])
def test_first_token_reaches_the_client_before_the_fetch_ends(
    workers: tuple[InProcessWorker, InProcessWorker], transport: str, mode: str
) -> None:
    check_first_token_before_the_fetch_ends(*workers, transport, mode)


@pytest.mark.gpu
def test_first_token_before_the_fetch_ends_on_cuda(
    loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same on one GPU (float32: P's 32-token chunks compute what the unified run does):
    CUDA IPC (the copy after `first`, tensor shared in-process) and gRPC (staged writes)."""
    sock = tmp_path_factory.mktemp("firsttok-cuda")
    opts: dict[str, Any] = dict(model=str(stories_dir), **{**COMMON, "device": "cuda", "dtype": "float32"})
    p = start_worker(loop, sock, "p", role="prefill", max_num_batched_tokens=32, kv_chunk_bytes=2048, **opts)
    d = start_worker(loop, sock, "d", role="decode", **opts)
    try:
        for transport in ("cuda-ipc", "grpc"):
            for mode in ("greedy", "seeded"):
                check_first_token_before_the_fetch_ends(p, d, transport, mode)
    finally:
        stop_worker(loop, p)
        stop_worker(loop, d)


def check_first_token_before_the_fetch_ends(
    p: InProcessWorker, d: InProcessWorker, transport: str, mode: str
) -> None:
    """With D holding P's stream back after `first`, D's client has the first token while the
    request is still FETCHING; the whole output equals P's unified run; nothing is left."""
    d.servicer.kv_preferences = (transport, "grpc") if transport != "grpc" else ("grpc",)
    sp = sampling(mode)
    rid = f"early-{transport}-{mode}"
    expected = unified(p, f"{rid}-u", sp)
    with decode_holds_after_first(d) as gate:
        call, handle = prefill_stream(p, rid, sp)
        stream = DecodeStream(d, rid, sp, handle)
        assert stream.first.wait(30), "the first token waited for the rest of the fetch"
        assert rid in d.engine.fetching  # still fetching: kv_fetched has not run
        reply = prefill_reply(call)
        gate.set()
        got = stream.result()
    assert list(got[0].token_ids) == list(reply.first.token_ids)
    assert_same(got, expected)
    assert_usage(stream, len(flatten(got)[0]))
    assert d.servicer.fetch_stats[-1].ok and d.servicer.fetch_stats[-1].transport == transport
    wait_no_blocks(stub(p), stub(d))


@pytest.mark.parametrize("mode", ["greedy", "seeded", "guided"])
def test_fetch_failing_after_the_first_token_continues_from_it(
    loop: LoopThread,
    workers: tuple[InProcessWorker, InProcessWorker],
    stories_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """P sends `first` and stops before its CUDA IPC chunk; the client has the token; then P's
    server stops: D's fetch fails, D computes prompt + that token and continues from it (guided
    decoding advanced once by it). The client sees the token once, the rest equals the unified
    run, D keeps no block."""
    reference, d = workers
    d.servicer.kv_preferences = ("cuda-ipc", "grpc")
    dying = start_worker(
        loop,
        tmp_path_factory.mktemp(f"dying-{mode}"),
        "dying",
        role="prefill",
        max_num_batched_tokens=32,
        model=str(stories_dir),
        **COMMON,
    )
    dying.servicer.kv_transports = ("cuda-ipc", "grpc")
    sp = sampling(mode)
    rid = f"dies-{mode}"
    expected = unified(reference, f"{rid}-u", sp)
    failed_before = sum(not s.ok for s in d.servicer.fetch_stats)
    try:
        with prefill_pauses_after_first(monkeypatch):
            call, handle = prefill_stream(dying, rid, sp)
            stream = DecodeStream(d, rid, sp, handle)
            assert stream.first.wait(30), "the first token waited for the rest of the fetch"
            assert rid in d.engine.fetching
            reply = prefill_reply(call)
            loop.run(dying.server.server.stop(0))  # P is gone before its CUDA IPC chunk
            got = stream.result()
    finally:
        stop_worker(loop, dying)
    tokens, _ = flatten(got)
    assert tokens[:1] == list(reply.first.token_ids)
    assert_same(got, expected)
    assert_usage(stream, len(tokens))
    failed = [s for s in d.servicer.fetch_stats if not s.ok]
    assert len(failed) == failed_before + 1
    wait_no_blocks(stub(d))


@pytest.mark.parametrize("ending", ["stop_token", "max_tokens_1"])
def test_a_first_token_that_ends_the_choice_ends_the_request_at_once(
    workers: tuple[InProcessWorker, InProcessWorker], monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """P's token ends the choice (a stop token id, or max_tokens 1): D streams it with its finish
    reason and ends while P's stream still holds its CUDA IPC chunk back; D's reserved blocks and
    P's handle are freed."""
    p, d = workers
    d.servicer.kv_preferences = ("cuda-ipc", "grpc")
    greedy_first = flatten(unified(p, f"end-{ending}-probe", sampling("greedy", 1)))[0][0]
    if ending == "stop_token":
        sp = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=8, stop_token_ids=[greedy_first], logprobs=1
        )
        reason = common_pb2.FINISH_REASON_STOP
    else:
        sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
        reason = common_pb2.FINISH_REASON_LENGTH
    expected = unified(p, f"end-{ending}-u", sp)
    rid = f"end-{ending}"
    with prefill_pauses_after_first(monkeypatch):
        call, handle = prefill_stream(p, rid, sp)
        stream = DecodeStream(d, rid, sp, handle)
        got = stream.result()  # ends while P is paused before its CUDA IPC chunk
        prefill_reply(call)
    assert_same(got, expected)
    assert [c.finish_reason for c in got if c.finish_reason] == [reason]
    if ending == "stop_token":
        assert got[-1].stop_token_id == greedy_first
    assert_usage(stream, 1)
    assert rid not in d.engine.fetching and rid not in d.engine.requests
    wait_no_blocks(stub(p), stub(d))


@contextlib.contextmanager
def prefill_sends_slower_than_it_computes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """P's gRPC chunks of a layer-wise handle, after the first, wait for the prefill's end: the
    KV moves slower than the prefill computes it (as 512 MiB over gRPC behind a 100 ms prefill)."""
    stream_chunks = kv_transfer.stream_chunks

    async def slow(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        progress = args[5]
        assert isinstance(progress, LayerProgress)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        unsubscribe = progress.listen(lambda: loop.call_soon_threadsafe(done.set), per_layer=False)
        try:
            sent = 0
            async with contextlib.aclosing(stream_chunks(*args, **kwargs)) as items:
                async for item in items:
                    yield item
                    sent += not isinstance(item, kv_transfer.KeepAlive)
                    if sent == 1 and not progress.done:
                        await asyncio.wait_for(done.wait(), GATE_TIMEOUT_S)
        finally:
            unsubscribe()

    monkeypatch.setattr(kv_transfer, "stream_chunks", slow)
    yield


def test_first_token_goes_before_kv_still_on_its_way(
    workers: tuple[InProcessWorker, InProcessWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer-wise gRPC fetch whose KV is slower than the prefill: P sends the sampled token as
    soon as the prefill completes, ahead of the chunks still to send (not at the stream's end, which
    made the first token wait for the whole transfer); D's output equals the unified run."""
    p, d = workers
    d.servicer.kv_preferences = ("grpc",)
    sp = sampling("greedy")
    rid = "first-ahead"
    expected = unified(p, f"{rid}-u", sp)
    kinds: list[str] = []
    fetch_kv = d.servicer._fetch_kv

    async def recorded(source: KVSource, skip_tokens: int) -> AsyncIterator[Any]:
        async with contextlib.aclosing(fetch_kv(source, skip_tokens)) as items:
            async for item in items:
                kinds.append("first" if isinstance(item, PrefillDone) else type(item).__name__)
                yield item

    monkeypatch.setattr(d.servicer, "_fetch_kv", recorded)
    with prefill_sends_slower_than_it_computes(monkeypatch):
        call, handle = prefill_stream(p, rid, sp)
        stream = DecodeStream(d, rid, sp, handle)
        reply = prefill_reply(call)
        got = stream.result()
    data = [i for i, kind in enumerate(kinds) if kind == "KVChunkData"]
    assert kinds.count("first") == 1 and len(data) > 2, kinds
    # at the latest right after the first chunk (the prefill may be done before P sends any), ahead of the rest
    assert kinds.index("first") <= data[0] + 1 < data[-1], kinds
    assert list(got[0].token_ids) == list(reply.first.token_ids)
    assert_same(got, expected)
    assert d.servicer.fetch_stats[-1].ok and d.servicer.fetch_stats[-1].transport == "grpc"
    wait_no_blocks(stub(p), stub(d))
