"""Layer-wise push between real worker gRPC servers (in-process, unix sockets).

The caller plays the gateway: Prefill(layerwise) on the prefill worker P, whose initial metadata
carries the KV handle as soon as P admitted the prompt; Generate(kv_source=handle) on the decode
worker D at once, whose FetchKV streams each layer's KV while P still computes the later ones and
ends with P's first token. Output must equal a unified engine's; the overlap is shown by recorded
events (P holds its last layer until D has received layer 0); failures mid-push end D's fetch
with a clear status, D computes the prompt itself, and no block or handle is left anywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_kv_transfer import Pair, make_prompts, sampling_pb, wait_no_blocks
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_transfer import KeepAlive, chunk_plan, ready_spans
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

MAX_TOKENS = 12
COMMON = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)
GATE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def pairs(
    loop: LoopThread, stories_dir: Path, tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Pair]]:
    """stories260K (5 layers) with 32-token prefill chunks on P (a prompt's layers become ready
    chunk by chunk) and small FetchKV chunks; the tiny Qwen3 (2 layers) with whole prompts."""
    from services.worker.model_config import load_model_config

    sock = tmp_path_factory.mktemp("sock")
    made: dict[str, Pair] = {}
    for name, model, prefill_opts in (
        ("stories", stories_dir, dict(max_num_batched_tokens=32, kv_chunk_bytes=2048)),
        ("qwen3", tiny_qwen3_dir, dict(kv_chunk_bytes=4096)),
    ):
        opts: dict[str, Any] = dict(model=str(model), **COMMON)
        made[name] = Pair(
            start_worker(loop, sock, f"{name}-lp", role="prefill", **prefill_opts, **opts),
            start_worker(loop, sock, f"{name}-ld", role="decode", **opts),
            Engine(WorkerConfig(**opts)),
            load_model_config(str(model)).vocab_size,
        )
    yield made
    for pair in made.values():
        stop_worker(loop, pair.prefill)
        stop_worker(loop, pair.decode)


def start_prefill(
    p: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int], sp: SamplingParams
) -> tuple[Iterator[worker_pb2.PrefillEvent], worker_pb2.KVHandle]:
    """PrefillStream and its first event, the handle (sent before the prefill ends)."""
    call = p.PrefillStream(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_pb(sp)),
        timeout=60,
    )
    handle = next(call).handle
    assert handle.layerwise and handle.num_tokens == len(prompt)
    return call, handle


def prefill_reply(call: Iterator[worker_pb2.PrefillEvent]) -> worker_pb2.PrefillResponse:
    events = list(call)
    assert len(events) == 1 and events[0].HasField("response")
    return events[0].response


def decode(
    d: worker_pb2_grpc.WorkerStub,
    rid: str,
    prompt: list[int],
    sp: SamplingParams,
    handle: worker_pb2.KVHandle,
) -> tuple[list[int], list[common_pb2.FinishReason.ValueType]]:
    """D's whole stream (its first output is P's token); (tokens, finish reasons)."""
    request = worker_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling_pb(sp), kv_source=handle
    )
    tokens: list[int] = []
    reasons = []
    for chunk in d.Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return tokens, reasons


def layerwise(pair: Pair, rid: str, prompt: list[int], sp: SamplingParams) -> list[int]:
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    call, handle = start_prefill(p, rid, prompt, sp)
    tokens, _ = decode(d, rid, prompt, sp, handle)
    reply = prefill_reply(call)
    assert list(reply.first.token_ids) == tokens[:1]  # D streamed P's token
    return tokens


@pytest.mark.parametrize("model", ["stories", "qwen3"])
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_layerwise_equals_unified(pairs: dict[str, Pair], model: str, mode: str) -> None:
    pair = pairs[model]
    prefix, prompts = make_prompts(pair.vocab_size)
    prompts = prompts[:16]

    def params(i: int) -> SamplingParams:
        if mode == "greedy":
            return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        return SamplingParams(temperature=1.0, top_k=40, seed=2000 + i, max_tokens=MAX_TOKENS)

    expected = pair.reference.generate(prompts, [params(i) for i in range(len(prompts))], prefix=f"lw-{mode}")
    layerwise(pair, f"lw-warm-{mode}", [*prefix, 5], params(0))  # the prefix is now in both caches
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(lambda i: layerwise(pair, f"lw-{mode}-{i}", prompts[i], params(i)), range(len(prompts)))
        )
    for i, (tokens, ref) in enumerate(zip(results, expected, strict=True)):
        assert tokens == ref.token_ids[0], f"request {i}"
    assert all(s.ok for s in pair.decode.servicer.fetch_stats[-len(prompts) :])
    wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))


class Recorder:
    """P's layer writes and D's received spans, in the order they happened; P's engine thread
    can be held after a given layer of its first layer-wise step until D received layer 0."""

    def __init__(self, prefill: InProcessWorker, decode: InProcessWorker, hold_after_layer: int) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.layer0_received = threading.Event()
        self.release = threading.Event()  # lets P go on (set by the test or when layer 0 arrives)
        self.hold_after_layer = hold_after_layer
        self.held = threading.Event()  # P is being held
        self.steps = 0
        self.waited_out = False
        signal = prefill.engine.layer_signal
        written = signal.written

        def record_written(layer: int) -> None:
            written(layer)
            if not signal._armed:  # a step without a layer-wise prompt
                return
            self._add("P", layer)
            if layer == hold_after_layer and self.steps == 0:
                self.steps += 1
                self.held.set()
                self.waited_out = not self.release.wait(GATE_TIMEOUT_S)

        signal.written = record_written  # type: ignore[method-assign]
        self._unhook_p: Callable[[], None] = lambda: setattr(signal, "written", written)
        write = decode.engine.write_fetched_kv

        def record_write(request_id: str, span: tuple[int, int, int, int], tensor: torch.Tensor) -> bool:
            for layer in range(span[0], span[1]):
                self._add("D", layer)
            if span[0] == 0:
                self.layer0_received.set()
            return write(request_id, span, tensor)

        decode.engine.write_fetched_kv = record_write  # type: ignore[method-assign]
        self._unhook_d: Callable[[], None] = lambda: setattr(decode.engine, "write_fetched_kv", write)

    def _add(self, side: str, layer: int) -> None:
        with self.lock:
            self.events.append((side, layer))

    def close(self) -> None:
        self.release.set()
        self._unhook_p()
        self._unhook_d()


def test_decode_receives_layer0_before_prefill_finishes_its_last_layer(
    pairs: dict[str, Pair],
) -> None:
    pair = pairs["qwen3"]  # whole prompt in one step: its last layer is the prefill's last
    num_layers = pair.prefill.engine.kv_cache.tensor.shape[0]
    rec = Recorder(pair.prefill, pair.decode, hold_after_layer=num_layers - 2)
    prompt = [1, *range(10, 60)]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = pair.reference.generate([prompt], sp, prefix="overlap")[0].token_ids[0]
    # P waits after its next-to-last layer until D has received layer 0 (or GATE_TIMEOUT_S)
    threading.Thread(target=lambda: rec.release.set() if rec.layer0_received.wait(60) else None).start()
    try:
        tokens = layerwise(pair, "overlap", prompt, sp)
    finally:
        rec.close()
    assert tokens == expected
    assert not rec.waited_out, "D never received layer 0 while P was still computing"
    events = rec.events
    first_d0 = events.index(("D", 0))
    p_last = events.index(("P", num_layers - 1))
    assert first_d0 < p_last, events
    wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))


def test_prefill_aborted_mid_push(pairs: dict[str, Pair]) -> None:
    """The Prefill call is cancelled after D received its first layers: P's handle fails, D's
    fetch ends with ABORTED (logged) and D computes the prompt itself: same tokens, no leak."""
    pair = pairs["stories"]  # 32-token chunks: the abort lands between two chunks
    num_layers = pair.prefill.engine.kv_cache.tensor.shape[0]
    rec = Recorder(pair.prefill, pair.decode, hold_after_layer=num_layers - 1)
    prompt = [1, *range(100, 170)]  # 71 tokens: 3 chunks
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = pair.reference.generate([prompt], sp, prefix="aborted")[0].token_ids[0]
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    failed_before = len([s for s in pair.decode.servicer.fetch_stats if not s.ok])
    try:
        call, handle = start_prefill(p, "aborted", prompt, sp)
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(decode, d, "aborted", prompt, sp, handle)
            assert rec.layer0_received.wait(60) and rec.held.wait(60)
            call.cancel()  # the gateway gave up on the prefill (P's engine is held mid-chunk)
            assert wait_for(lambda: pair.prefill.servicer.num_pending == 0)
            rec.release.set()
            tokens, _ = out.result(60)
    finally:
        rec.close()
    assert tokens == expected
    failed = [s for s in pair.decode.servicer.fetch_stats if not s.ok][failed_before:]
    assert len(failed) == 1 and "aborted" in failed[0].error, failed
    wait_no_blocks(p, d)


def test_prefill_worker_dies_mid_push(
    loop: LoopThread, pairs: dict[str, Pair], stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """P's server stops while D's fetch is open: D's fetch fails, D computes the prompt itself
    (same tokens) and keeps no block."""
    pair = pairs["stories"]
    dying = start_worker(
        loop,
        tmp_path_factory.mktemp("dying"),
        "dying-p",
        role="prefill",
        max_num_batched_tokens=32,
        kv_chunk_bytes=2048,
        model=str(stories_dir),
        **COMMON,
    )
    num_layers = dying.engine.kv_cache.tensor.shape[0]
    rec = Recorder(dying, pair.decode, hold_after_layer=num_layers - 1)
    prompt = [1, *range(200, 270)]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = pair.reference.generate([prompt], sp, prefix="dies")[0].token_ids[0]
    d = pair.stub(pair.decode)
    failed_before = len([s for s in pair.decode.servicer.fetch_stats if not s.ok])
    stopped = False
    try:
        _, handle = start_prefill(pair.stub(dying), "dies", prompt, sp)
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(decode, d, "dies", prompt, sp, handle)
            assert rec.layer0_received.wait(60) and rec.held.wait(60)
            loop.run(dying.server.server.stop(0))  # the prefill worker is gone mid-push
            tokens, _ = out.result(60)
            rec.release.set()
            stop_worker(loop, dying)
            stopped = True
    finally:
        rec.close()
        if not stopped:
            stop_worker(loop, dying)
    assert tokens == expected
    failed = [s for s in pair.decode.servicer.fetch_stats if not s.ok][failed_before:]
    assert len(failed) == 1, failed
    wait_no_blocks(d)


def test_keep_alives_hold_a_waiting_fetch_open(
    loop: LoopThread, pairs: dict[str, Pair], stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A decode worker with a 1.5 s stall timeout waits for a prefill held for 3 keep-alives (3 s)
    between its chunks: the keep-alives count as progress, the fetch succeeds."""
    pair = pairs["stories"]
    patient = start_worker(
        loop,
        tmp_path_factory.mktemp("patient"),
        "patient-d",
        role="decode",
        kv_fetch_stall_timeout=1.5,
        model=str(stories_dir),
        **COMMON,
    )
    num_layers = pair.prefill.engine.kv_cache.tensor.shape[0]
    rec = Recorder(pair.prefill, patient, hold_after_layer=num_layers - 1)
    keep_alives = threading.Event()
    fetch_kv = patient.servicer._fetch_kv

    async def counting(source: Any, skip_tokens: int) -> Any:
        seen = 0
        async for item in fetch_kv(source, skip_tokens):
            if isinstance(item, KeepAlive):
                seen += 1
                if seen >= 3:
                    keep_alives.set()
            yield item

    patient.servicer._fetch_kv = counting  # type: ignore[method-assign]
    threading.Thread(target=lambda: rec.release.set() if keep_alives.wait(60) else None).start()
    prompt = [1, *range(300, 339)]  # 40 tokens: a 32-token chunk, then 8 (P is held in between)
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    expected = pair.reference.generate([prompt], sp, prefix="patient")[0].token_ids[0]
    try:
        p, d = pair.stub(pair.prefill), pair.stub(patient)
        call, handle = start_prefill(p, "patient", prompt, sp)
        tokens, _ = decode(d, "patient", prompt, sp, handle)
        prefill_reply(call)
        assert tokens == expected
        assert keep_alives.is_set() and not rec.waited_out
        assert [s.ok for s in patient.servicer.fetch_stats] == [True]
        wait_no_blocks(p, d)
    finally:
        rec.close()
        stop_worker(loop, patient)


def test_guided_decoding_continues_from_the_prefills_token(pairs: dict[str, Pair]) -> None:
    """The decode worker's grammar state takes the prefill's first token (Request.add_generated):
    a regex-guided layer-wise request equals the same request on one worker."""
    pair = pairs["stories"]
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    prompt = [1, *range(400, 440)]
    for seed in (3, 4):
        sp = common_pb2.SamplingParams(temperature=1.0, seed=seed, max_tokens=16)
        sp.guided.regex = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}\."
        unified = [
            t
            for chunk in p.Generate(
                worker_pb2.GenerateRequest(request_id=f"g-u{seed}", prompt_token_ids=prompt, sampling=sp),
                timeout=60,
            )
            for choice in chunk.choices
            for t in choice.token_ids
        ]
        events = p.PrefillStream(
            worker_pb2.PrefillRequest(request_id=f"g-{seed}", prompt_token_ids=prompt, sampling=sp),
            timeout=60,
        )
        handle = next(events).handle
        request = worker_pb2.GenerateRequest(
            request_id=f"g-{seed}", prompt_token_ids=prompt, sampling=sp, kv_source=handle
        )
        tokens = [
            t
            for chunk in d.Generate(request, timeout=60)
            for choice in chunk.choices
            for t in choice.token_ids
        ]
        prefill_reply(events)
        assert tokens == unified and len(tokens) > 3
    assert all(s.ok for s in pair.decode.servicer.fetch_stats[-2:])
    wait_no_blocks(p, d)


def test_first_token_ends_the_choice(pairs: dict[str, Pair]) -> None:
    """max_tokens = 1: P's token ends the choice; D streams it with its finish reason and
    decodes nothing; both sides free everything."""
    pair = pairs["qwen3"]
    prompt = [1, *range(30, 70)]
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    expected = pair.reference.generate([prompt], sp, prefix="one")[0].token_ids[0]
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    call, handle = start_prefill(p, "one", prompt, sp)
    tokens, reasons = decode(d, "one", prompt, sp, handle)
    assert tokens == expected and reasons == [common_pb2.FINISH_REASON_LENGTH]
    assert prefill_reply(call).first.finish_reason == common_pb2.FINISH_REASON_LENGTH
    wait_no_blocks(p, d)


def test_layerwise_handle_errors(pairs: dict[str, Pair]) -> None:
    """An unfetched layer-wise handle whose prefill was cancelled is gone at once with the reason;
    a kv_source with `layerwise` and no first token is accepted, one without is still refused."""
    pair = pairs["qwen3"]
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    prompt = [1, *range(70, 90)]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    call, handle = start_prefill(p, "errors", prompt, sp)
    prefill_reply(call)  # completed, not fetched: it waits for its TTL; released here instead
    assert p.ReleaseKV(worker_pb2.ReleaseKVRequest(handle_id=handle.handle_id)).released
    old_style = worker_pb2.KVHandle()
    old_style.CopyFrom(handle)
    old_style.layerwise = False
    with pytest.raises(grpc.RpcError) as err:
        decode(d, "errors-old", prompt, sp, old_style)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the released handle: D's fetch gets NOT_FOUND and D computes the prompt (same tokens)
    expected = pair.reference.generate([prompt], sp, prefix="errors")[0].token_ids[0]
    tokens, _ = decode(d, "errors", prompt, sp, handle)
    assert tokens == expected
    wait_no_blocks(p, d)


@pytest.mark.parametrize(
    ("device", "transport"),
    [
        ("cpu", "cuda-ipc"),  # the CUDA IPC protocol with the tensor shared in-process
        pytest.param("cuda", "cuda-ipc", marks=pytest.mark.gpu),
        pytest.param("cuda", "grpc", marks=pytest.mark.gpu),  # events + the reader's side stream
    ],
)
def test_layerwise_per_transport(
    loop: LoopThread,
    stories_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    device: str,
    transport: str,
) -> None:
    """Layer-wise push over CUDA IPC (the prefill completes, then one copy) and, on a GPU, over
    gRPC (each span read on a side stream after its layer's event): unified output, no leak."""
    sock = tmp_path_factory.mktemp(f"lw-{device}-{transport}")
    # (float32 on CUDA too: the prefill's 32-token chunks then compute what the reference does)
    opts: dict[str, Any] = dict(model=str(stories_dir), **{**COMMON, "device": device, "dtype": "float32"})
    made = Pair(
        start_worker(loop, sock, "p", role="prefill", max_num_batched_tokens=32, **opts),
        start_worker(loop, sock, "d", role="decode", **opts),
        Engine(WorkerConfig(**opts)),
        0,
    )
    try:
        if device == "cpu":
            for w in (made.prefill, made.decode):
                w.servicer.kv_transports = ("cuda-ipc", "grpc")
        made.decode.servicer.kv_preferences = (transport, "grpc") if transport != "grpc" else ("grpc",)
        prefix, prompts = make_prompts(made.reference.model_config.vocab_size)
        prompts = prompts[:6]
        sp = SamplingParams(temperature=0.0, max_tokens=8)
        expected = made.reference.generate(prompts, sp, prefix="per-transport")
        layerwise(made, "t-warm", [*prefix, 5], sp)  # partial fetches: the prefix is in D's cache
        for i, prompt in enumerate(prompts):
            assert layerwise(made, f"t-{i}", prompt, sp) == expected[i].token_ids[0], f"request {i}"
        stats = made.decode.servicer.fetch_stats[-len(prompts) :]
        assert all(s.ok and s.transport == transport for s in stats), stats
        wait_no_blocks(made.stub(made.prefill), made.stub(made.decode))
    finally:
        stop_worker(loop, made.prefill)
        stop_worker(loop, made.decode)


def test_ready_spans_cover_each_cell_once_and_equal_the_plan_when_all_ready() -> None:
    layers, blocks, per_layer, target = 5, 9, 100, 350
    assert ready_spans([2] * layers, (blocks,) * layers, per_layer, target) == chunk_plan(
        layers, blocks, 2, per_layer, target
    )
    sent = [0] * layers
    cells: set[tuple[int, int]] = set()
    # layers become ready unevenly (chunked prefill: lower layers ahead), then all at once
    for ready in [(3, 0, 0, 0, 0), (3, 3, 3, 0, 0), (6, 3, 3, 3, 3), (9, 6, 6, 6, 3), (9,) * 5]:
        for l0, l1, b0, b1 in ready_spans(sent, ready, per_layer, target):
            for layer in range(l0, l1):
                for block in range(b0, b1):
                    assert (layer, block) not in cells and block < ready[layer]
                    cells.add((layer, block))
    assert cells == {(la, b) for la in range(layers) for b in range(blocks)}


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
