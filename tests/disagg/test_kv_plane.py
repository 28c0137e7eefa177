"""The KV data plane: the zero-copy gRPC chunk codec (byte-exact against protobuf for several
layouts), transport negotiation and fallback, the CUDA IPC protocol (exercised on the CPU between
two in-process workers: the decode worker reads the prefill worker's cache tensor directly, which
is what a mapped CUDA IPC handle gives it), and a stalled transfer that ends in local recompute
with no block leaked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_kv_transfer import (
    COMMON,
    Pair,
    disaggregated,
    made_vocab,
    make_prompts,
    sampling_pb,
    wait_no_blocks,
)
from worker_servers import LoopThread, start_worker, stop_worker

from services.worker import kv_transfer, kv_transports, kv_wire
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import KV_DTYPE_NAMES
from services.worker.request import EngineRequest, SamplingParams
from services.worker.rpc import chunk_from_wire, encode_chunk
from tandem.v1 import worker_pb2

# ---- the gRPC codec: byte-exact against a protobuf-built KVChunk -----------------------------------


def legacy_chunk(kv: torch.Tensor, block_ids: tuple[int, ...], span: kv_transfer.Span) -> bytes:
    """What FetchKV sent before the zero-copy codec: a KVChunk built and serialized by protobuf."""
    l0, l1, b0, b1 = span
    part = kv[l0:l1].index_select(2, torch.tensor(block_ids[b0:b1])).contiguous()
    return worker_pb2.KVChunk(
        layer_start=l0,
        layer_end=l1,
        block_start=b0,
        block_end=b1,
        data=part.view(torch.uint8).numpy().tobytes(),
        dtype=KV_DTYPE_NAMES[kv.dtype],
        shape=tuple(part.shape),
    ).SerializeToString()


LAYOUTS = {
    # name: (dtype, num_layers, num_blocks in the cache, block ids of the handle, first block, chunk bytes)
    "bf16": (torch.bfloat16, 3, 12, (4, 5, 6, 7, 8), 0, 2048),
    "fp8": (torch.float8_e4m3fn, 2, 9, (8, 1, 3), 0, 1024),
    "fp32-odd-blocks": (torch.float32, 4, 11, (0, 2, 4, 6, 8, 10, 1), 0, 3000),
    "bf16-partial-fetch": (torch.bfloat16, 3, 12, (9, 3, 4, 5, 11), 2, 1 << 20),
    "fp32-one-block-per-layer-chunk": (torch.float32, 5, 6, (5, 0, 2), 1, 200),
}


def random_cache(dtype: torch.dtype, num_layers: int, num_blocks: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(num_layers * 100 + num_blocks)
    kv = torch.randn((num_layers, 2, num_blocks, 4, 2, 8), generator=gen)
    return kv.to(dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wire_chunks_equal_protobuf_and_land_byte_exact(layout: str) -> None:
    dtype, num_layers, num_blocks, block_ids, first_block, target = LAYOUTS[layout]
    kv = random_cache(dtype, num_layers, num_blocks)
    layer_block_bytes = kv[0, :, 0].numel() * kv.element_size()
    plan = kv_transfer.chunk_plan(num_layers, len(block_ids), first_block, layer_block_bytes, target)
    assert plan
    # the decode side: a cache with its own block numbering, filled from the decoded chunks
    dst = torch.zeros_like(kv)
    dst_ids = list(range(num_blocks - len(block_ids), num_blocks))[::-1]
    reservation = kv_transfer.KVReservation(first_block * 4, len(block_ids))
    for span in plan:
        raw = encode_chunk(kv_transfer.read_chunk(kv, block_ids, span))
        assert raw == legacy_chunk(kv, block_ids, span), span  # the exact bytes protobuf writes
        assert worker_pb2.KVChunk.FromString(raw).SerializeToString() == raw
        received = chunk_from_wire(kv_wire.decode_chunk(raw))
        assert isinstance(received, kv_transfer.KVChunkData)
        tensor = kv_transfer.chunk_tensor(received, dst, reservation)
        l0, l1, b0, b1 = span
        for i, b in enumerate(range(b0, b1)):
            dst[l0:l1, :, dst_ids[b]] = tensor[:, :, i]
    for b in range(first_block, len(block_ids)):
        sent = kv[:, :, block_ids[b]].view(torch.uint8)
        assert torch.equal(dst[:, :, dst_ids[b]].view(torch.uint8), sent), f"block {b}"


def test_decode_chunk_views_the_received_bytes_without_copying() -> None:
    kv = random_cache(torch.float32, 2, 4)
    raw = encode_chunk(kv_transfer.read_chunk(kv, (1, 2), (0, 2, 0, 2)))
    wire = kv_wire.decode_chunk(raw)
    assert wire.data.obj is raw  # a view into gRPC's bytes, not a copy
    assert not wire.header.data  # the header was parsed without the KV bytes


def test_decode_chunk_reads_an_ipc_chunk() -> None:
    ipc = worker_pb2.CudaIpcKV(tensor_handle=b"h", tensor_id="t", block_ids=[3, 9], block_start=1)
    raw = worker_pb2.KVChunk(transport=worker_pb2.KV_TRANSPORT_CUDA_IPC, cuda_ipc=ipc).SerializeToString()
    item = chunk_from_wire(kv_wire.decode_chunk(raw))
    assert item == kv_transfer.IpcBlocks(kv_transports.SharedTensor("t", b"h"), 1, (3, 9))


# ---- negotiation -------------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_negotiation_picks_the_fastest_common_transport_and_falls_back() -> None:
    both = ("cuda-ipc", "grpc")
    assert kv_transports.choose(both, "host-a", both, "host-a") == "cuda-ipc"
    # another host: no CUDA IPC
    assert kv_transports.choose(both, "host-b", both, "host-a") == "grpc"
    assert kv_transports.choose(both, "", both, "host-a") == "grpc"
    # the prefill worker has no CUDA (or an old caller sent nothing)
    assert kv_transports.choose(both, "host-a", ("grpc",), "host-a") == "grpc"
    assert kv_transports.choose((), "host-a", both, "host-a") == "grpc"
    # NIXL is skipped where the prefill side lacks it
    assert kv_transports.choose(("nixl", "grpc"), "h", both, "h") == "grpc"
    assert kv_transports.choose(("nixl", "grpc"), "h", ("nixl", "grpc"), "h") == "nixl"
    # the caller's order wins
    assert kv_transports.choose(("grpc", "cuda-ipc"), "h", both, "h") == "grpc"


def test_preferences_follow_the_flag_and_say_why_not() -> None:
    assert kv_transports.preferences("auto", ("cuda-ipc", "grpc"), CUDA) == ("cuda-ipc", "grpc")
    assert kv_transports.preferences("auto", ("grpc",), CPU) == ("grpc",)
    assert kv_transports.preferences("grpc", ("cuda-ipc", "grpc"), CUDA) == ("grpc",)
    assert kv_transports.preferences("cuda-ipc", ("cuda-ipc", "grpc"), CUDA) == ("cuda-ipc", "grpc")
    assert kv_transports.preferences("cuda-ipc", ("grpc",), CPU) == ("grpc",)
    assert kv_transports.preferences("nixl", ("grpc",), CPU) == ("grpc",)
    assert kv_transports.unavailable_reason("cuda-ipc", CPU).startswith("CUDA IPC needs a CUDA device")
    assert kv_transports.unavailable_reason("nixl", CPU)  # not installed, or no data path
    assert kv_transports.supported(CPU) == ("grpc",)
    assert kv_transports.unavailable_reason("grpc", CPU) == ""


def test_a_cuda_ipc_handle_may_only_name_torch_tensor_parts() -> None:
    import io
    import pickle

    # what torch's reduce_tensor gives for a CUDA tensor (rebuild_cuda_tensor's arguments) passes
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    storage_cls = type(t._typed_storage())
    for dtype in KV_DTYPE_NAMES:
        args = (
            type(t),
            t.size(),
            t.stride(),
            0,
            storage_cls,
            dtype,
            0,
            b"h" * 64,
            96,
            0,
            False,
            b"r",
            0,
            b"e",
            True,
        )
        blob = pickle.dumps(("rebuild_cuda_tensor", args))
        name, got = kv_transports._HandleUnpickler(io.BytesIO(blob)).load()
        assert (name, got[0], got[4], got[5]) == ("rebuild_cuda_tensor", torch.Tensor, storage_cls, dtype)
    evil = pickle.dumps(("rebuild_cuda_tensor", (print, ("pwned",))))
    with pytest.raises(pickle.UnpicklingError, match=r"may not name builtins\.print"):
        kv_transports.import_tensor(kv_transports.SharedTensor("elsewhere", evil))


# ---- the CUDA IPC protocol and a stalled transfer, between real worker servers ------------------------


@pytest.fixture(scope="module")
def ipc_pair(loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    sock = tmp_path_factory.mktemp("sock")
    opts: dict[str, Any] = dict(model=str(stories_dir), **COMMON)
    pair = Pair(
        start_worker(loop, sock, "ipc-p", role="prefill", **opts),
        start_worker(loop, sock, "ipc-d", role="decode", **opts),
        Engine(WorkerConfig(**opts)),
        made_vocab(stories_dir),
    )
    # Both in this process on one host: CUDA IPC's protocol with the tensor shared in-process
    # (kv_transports.import_tensor returns the exporter's own tensor; on a GPU it maps the handle).
    for w in (pair.prefill, pair.decode):
        w.servicer.kv_transports = ("cuda-ipc", "grpc")
    pair.decode.servicer.kv_preferences = ("cuda-ipc", "grpc")
    yield pair
    stop_worker(loop, pair.prefill)
    stop_worker(loop, pair.decode)


def test_cuda_ipc_protocol_equals_unified_and_leaks_nothing(ipc_pair: Pair) -> None:
    pair = ipc_pair
    prefix, prompts = make_prompts(pair.vocab_size)
    prompts = prompts[:8]
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    expected = pair.reference.generate(prompts, sp, prefix="ipc")
    disaggregated(pair, "ipc-warm", [*prefix, 5], sp)  # partial fetches: the prefix is in D's cache
    for i, prompt in enumerate(prompts):
        tokens, _ = disaggregated(pair, f"ipc-{i}", prompt, sp)
        assert tokens == expected[i].token_ids[0], f"request {i}"
    stats = pair.decode.servicer.fetch_stats[-len(prompts) :]
    assert all(s.ok and s.transport == "cuda-ipc" for s in stats), stats
    # (the device copy alone is timed too, within the fetch's time)
    assert all(0 < s.copy_seconds <= s.seconds for s in stats if s.num_bytes), stats
    wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))
    # the decode worker asks for gRPC only: the same prefill worker streams chunks
    pair.decode.servicer.kv_preferences = ("grpc",)
    try:
        tokens, _ = disaggregated(pair, "ipc-grpc", prompts[0], sp)
    finally:
        pair.decode.servicer.kv_preferences = ("cuda-ipc", "grpc")
    assert tokens == expected[0].token_ids[0]
    assert pair.decode.servicer.fetch_stats[-1].transport == "grpc"
    wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))


def test_stalled_transfer_recomputes_locally_and_frees_every_block(loop: LoopThread, ipc_pair: Pair) -> None:
    """A peer that sends part of the KV and then goes silent: past the stall timeout the fetch
    fails, the decode worker computes the prompt (same tokens) and no block stays reserved."""
    decode = ipc_pair.decode
    engine = decode.engine
    prompt = make_prompts(ipc_pair.vocab_size)[1][3]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = ipc_pair.reference.generate([prompt], sp, prefix="stall")[0].token_ids[0]
    kv = engine.kv_cache.tensor
    release = asyncio.Event()

    async def stalling_peer(source: kv_transfer.KVSource, skip_tokens: int) -> AsyncIterator[Any]:
        # one real chunk of the right shape, then nothing
        block = kv[0:1, :, 0:1].clone()
        data = block.view(torch.uint8).numpy().tobytes()
        yield kv_transfer.KVChunkData(
            0, 1, skip_tokens // 16, skip_tokens // 16 + 1, data, "float32", tuple(block.shape)
        )
        await release.wait()

    async def run() -> tuple[kv_transfer.FetchStats, list[int]]:
        req = EngineRequest("stalled", tuple(prompt), sp, generated_token_ids=(expected[0],))
        outputs = decode.async_engine.submit(req, add=engine.add_fetching_request)
        source = kv_transfer.KVSource("h", "nowhere", len(prompt), "")
        stats = await kv_transfer.receive(
            decode.async_engine.call, engine, kv, "stalled", source, stalling_peer, stall_timeout_s=0.3
        )
        tokens = [expected[0]]
        while True:
            out = await outputs.get()
            for choice in out.choices:
                tokens += choice.token_ids
            if out.finished:
                return stats, tokens

    stats, tokens = loop.run(run())
    assert not stats.ok and "no KV arrived for 0.3 s" in stats.error
    assert tokens == expected
    wait_no_blocks(ipc_pair.stub(decode))


def test_a_cuda_ipc_copy_schedules_the_request_before_the_stream_closes(
    loop: LoopThread, ipc_pair: Pair
) -> None:
    """The engine call that copies a CUDA IPC fetch's blocks also hands the request to the
    scheduler: its decode does not wait for the stream's close and another engine-thread hop."""
    decode = ipc_pair.decode
    engine = decode.engine
    prompt = make_prompts(ipc_pair.vocab_size)[1][4]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    kv = engine.kv_cache.tensor
    # a peer's cache in this process (the same-process path of CUDA IPC), apart from D's own: a
    # copy between overlapping blocks of one tensor is refused by torch
    peer = kv_transports.export_tensor(torch.zeros_like(kv))
    at_close: list[bool] = []

    async def ipc_peer(source: kv_transfer.KVSource, skip_tokens: int) -> AsyncIterator[Any]:
        first, last = skip_tokens // 16, -(-len(prompt) // 16)
        try:
            yield kv_transfer.IpcBlocks(peer, first, tuple(range(first, last)))
            await asyncio.sleep(30)  # (until the reader closes the stream)
        finally:
            at_close.append("ipc-sched" not in engine.fetching)

    async def run() -> kv_transfer.FetchStats:
        req = EngineRequest("ipc-sched", tuple(prompt), sp, generated_token_ids=(7,))
        outputs = decode.async_engine.submit(req, add=engine.add_fetching_request)
        source = kv_transfer.KVSource("h", "nowhere", len(prompt), "")
        stats = await kv_transfer.receive(decode.async_engine.call, engine, kv, "ipc-sched", source, ipc_peer)
        while not (await outputs.get()).finished:
            pass
        return stats

    stats = loop.run(run())
    assert stats.ok and stats.transport == "cuda-ipc", stats
    assert at_close == [True]  # scheduled by the copy's own call, before the close
    wait_no_blocks(ipc_pair.stub(decode))


def test_fetch_of_a_dead_peer_fails_fast_and_recomputes(ipc_pair: Pair) -> None:
    """A kv_source naming a worker that is not there: FetchKV fails, the prompt is computed."""
    pair = ipc_pair
    prompt = make_prompts(pair.vocab_size)[1][5]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = pair.reference.generate([prompt], sp, prefix="dead")[0].token_ids[0]

    request = worker_pb2.GenerateRequest(
        request_id="dead-peer",
        prompt_token_ids=prompt,
        sampling=sampling_pb(sp),
        generated_token_ids=expected[:1],
        kv_source=worker_pb2.KVHandle(
            handle_id="x",
            address="unix:/nonexistent/dead.sock",
            num_tokens=len(prompt),
            fingerprint=pair.decode.servicer.fingerprint,
        ),
    )
    tokens = list(expected[:1])
    for chunk in pair.stub(pair.decode).Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
    assert tokens == expected
    assert not pair.decode.servicer.fetch_stats[-1].ok
    wait_no_blocks(pair.stub(pair.decode))


def test_a_failed_cuda_ipc_mapping_recomputes_then_uses_grpc(
    ipc_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer's tensor cannot be mapped (as when two containers share no /dev/shm): that fetch
    recomputes the prompt; later fetches from that peer ask for gRPC and succeed."""
    pair = ipc_pair

    def cannot_map(shared: kv_transports.SharedTensor) -> torch.Tensor:
        raise ValueError("cudaIpcOpenMemHandle: invalid argument")

    monkeypatch.setattr(kv_transports, "import_tensor", cannot_map)
    prompts = make_prompts(pair.vocab_size)[1][10:12]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    expected = pair.reference.generate(prompts, sp, prefix="nomap")
    try:
        for i, prompt in enumerate(prompts):
            tokens, _ = disaggregated(pair, f"nomap-{i}", prompt, sp)
            assert tokens == expected[i].token_ids[0]
        first, second = pair.decode.servicer.fetch_stats[-2:]
        assert (first.ok, first.transport) == (False, "cuda-ipc") and "cudaIpcOpenMemHandle" in first.error
        assert (second.ok, second.transport) == (True, "grpc")
        wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))
    finally:
        pair.decode.servicer._ipc_failed.clear()


@pytest.mark.parametrize("transport", ["grpc", "cuda-ipc"])
def test_reader_that_dies_mid_transfer_leaves_no_block_on_the_prefill_side(
    ipc_pair: Pair, transport: str
) -> None:
    """A decode worker that takes the first chunk (gRPC) or the CUDA IPC chunk and then goes away
    (its stream cancelled, as when its process dies): the prefill worker frees the handle's blocks."""
    pair = ipc_pair
    prompt = make_prompts(pair.vocab_size)[1][7]
    p = pair.stub(pair.prefill)
    reply = p.Prefill(
        worker_pb2.PrefillRequest(
            request_id=f"dies-{transport}",
            prompt_token_ids=prompt,
            sampling=sampling_pb(SamplingParams(temperature=0.0, max_tokens=4)),
        ),
        timeout=60,
    )
    assert p.GetLoad(worker_pb2.GetLoadRequest()).num_kv_handles == 1
    wanted = worker_pb2.KV_TRANSPORT_CUDA_IPC if transport == "cuda-ipc" else worker_pb2.KV_TRANSPORT_GRPC
    call = p.FetchKV(
        worker_pb2.FetchKVRequest(
            handle_id=reply.handle.handle_id,
            chunk_bytes=1024,  # several chunks over gRPC
            transports=[wanted],
            host_id=kv_transports.host_id(),
        ),
        timeout=30,
    )
    first = next(call)
    assert first.transport == (wanted if transport == "cuda-ipc" else worker_pb2.KV_TRANSPORT_UNSPECIFIED)
    call.cancel()
    wait_no_blocks(p)
