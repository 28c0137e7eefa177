"""In-process worker gRPC servers for the disaggregation tests (real servers on unix sockets).

Each `InProcessWorker` is a real `Engine` + `AsyncEngine` + `GrpcServer`, served from one
background event loop, so a test can start several workers (unified, prefill, decode) in about a
second without paying for a process and a torch import each. Also what their tests share: a
disaggregated request through a prefill and a decode worker, and a fetched chunk's cells.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from services.common.server import GrpcServer
from services.worker import kv_wire
from services.worker.async_engine import AsyncEngine
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.rpc import SERVICE_NAME, WorkerServicer, add_to_server
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class InProcessWorker:
    name: str
    engine: Engine
    async_engine: AsyncEngine
    server: GrpcServer
    servicer: WorkerServicer

    @property
    def address(self) -> str:
        return self.server.bound_address


def start_worker(loop: LoopThread, sock_dir: Path, name: str, **options: Any) -> InProcessWorker:
    """A worker on a unix socket in `sock_dir` (or on options["address"], e.g. 127.0.0.1:0 for
    one with --kv-wire-helpers, which serve TCP)."""
    options.setdefault("address", f"unix:{sock_dir / (name + '.sock')}")
    config = WorkerConfig(**options)
    engine = Engine(config)
    async_engine = AsyncEngine(engine)

    async def start() -> InProcessWorker:
        server = GrpcServer(config.address, grace_s=1.0)
        servicer = add_to_server(server.server, async_engine)
        server.add_service_name(SERVICE_NAME)
        async_engine.start()
        await server.start()
        servicer.advertise_address = server.bound_address
        await servicer.start_wire_helpers(server.bound_address)
        return InProcessWorker(name, engine, async_engine, server, servicer)

    return loop.run(start())


def stop_worker(loop: LoopThread, worker: InProcessWorker) -> None:
    loop.run(worker.server.server.stop(0.5))
    loop.run(worker.servicer.close())
    worker.async_engine.stop()


def stub(w: InProcessWorker) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))


def disaggregated(
    prefill: InProcessWorker, decode: InProcessWorker, rid: str, prompt: list[int], max_tokens: int
) -> list[int]:
    """A greedy request's tokens: Prefill on `prefill` (the first token), then Generate on
    `decode` with the handle as its kv_source (the rest)."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    reply = stub(prefill).Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling), timeout=60
    )
    tokens = list(reply.first.token_ids)
    request = worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=sampling,
        generated_token_ids=tokens,
        kv_source=reply.handle,
    )
    for chunk in stub(decode).Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
    return tokens


def add_cells(cells: dict[tuple[int, int], bytes], chunk: kv_wire.WireChunk, lock: threading.Lock) -> None:
    """Add every (layer, block) cell of a received fp32 KV chunk to `cells` (each at most once)."""
    h = chunk.header
    assert chunk.data, "a data chunk"
    part = torch.frombuffer(bytearray(chunk.data), dtype=torch.float32).view(tuple(h.shape))
    with lock:
        for li in range(h.layer_end - h.layer_start):
            for bi in range(h.block_end - h.block_start):
                key = (h.layer_start + li, h.block_start + bi)
                assert key not in cells, f"cell {key} sent twice"
                cells[key] = part[li, :, bi].numpy().tobytes()
