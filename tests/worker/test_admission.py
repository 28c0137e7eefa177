"""Admission (services/worker/async_engine.py): the sessions of one GenerateMany message reach the
engine's first step together, not the first one alone while the event loop admits the rest; a
declared session that is never admitted holds one step at most, never every later one."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import grpc

from services.common.server import GrpcServer
from services.worker.async_engine import AsyncEngine
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams
from services.worker.rpc import add_to_server
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

SESSIONS = 48
CONFIG: dict[str, Any] = dict(device="cpu", kv_cache_memory="16MiB", max_model_len=512, cpu_threads=1)


def _count_requests_per_step(engine: AsyncEngine) -> list[int]:
    """How many requests the engine holds as each step begins (appended on the engine thread)."""
    held: list[int] = []
    step = engine.engine.step

    def counted() -> Any:
        held.append(len(engine.engine.requests))
        return step()

    engine.engine.step = counted  # type: ignore[method-assign]
    return held


async def test_the_sessions_of_one_message_start_in_one_step(stories_dir: Path, tmp_path: Path) -> None:
    config = WorkerConfig(address=f"unix:{tmp_path / 'w.sock'}", model=str(stories_dir), **CONFIG)
    # A wait far longer than admitting the sessions takes, even on a loaded machine: the test
    # then depends on the mechanism, not on timing.
    engine = AsyncEngine(Engine(config), admission_wait=60.0)
    held = _count_requests_per_step(engine)
    # The GIL handed between the threads as often as Python allows: the engine thread would step
    # as soon as the first request is submitted, while the loop admits the others.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    engine.start()
    server = GrpcServer(config.address, grace_s=1.0)
    servicer = add_to_server(server.server, engine)
    await server.start()
    starts = [
        worker_pb2.GenerateSessionRequest(
            session_id=i,
            start=worker_pb2.GenerateSessionStart(
                request=worker_pb2.GenerateRequest(
                    request_id=f"burst-{i}",
                    prompt_token_ids=[1, 403 + i, 251, 263, 93, 291],
                    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                )
            ),
        )
        for i in range(SESSIONS)
    ]
    try:
        async with grpc.aio.insecure_channel(config.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.GenerateMany()
            await call.write(worker_pb2.GenerateManyRequest(requests=starts))  # one message, every session
            await call.done_writing()
            ended: dict[int, int] = {}
            async for message in call:
                for answer in message.responses:
                    if answer.HasField("end"):
                        ended[answer.session_id] = answer.end.code
    finally:
        await server.server.stop(0)
        await servicer.close()
        engine.stop()
        sys.setswitchinterval(interval)
    assert ended == dict.fromkeys(range(SESSIONS), grpc.StatusCode.OK.value[0])
    assert held[0] == SESSIONS, held  # every session's request was in the engine when it first stepped


def test_a_session_never_admitted_holds_one_step_at_most(stories_dir: Path) -> None:
    config = WorkerConfig(model=str(stories_dir), **CONFIG)
    engine = AsyncEngine(Engine(config), admission_wait=0.05)
    waits: list[bool] = []
    await_admissions = engine._await_admissions

    def recorded() -> bool:
        waited = await_admissions()
        waits.append(waited)
        return waited

    engine._await_admissions = recorded  # type: ignore[method-assign]
    engine.start()
    done = threading.Event()

    async def run() -> int:
        never = engine.expect()  # a session whose request is never submitted (until the end)
        outputs = engine.submit(
            EngineRequest(
                "alone", (1, 403, 251, 263), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            )
        )
        tokens = 0
        while True:
            out = await asyncio.wait_for(outputs.get(), 60)
            assert not isinstance(out, BaseException)
            tokens += sum(len(c.token_ids) for c in out.choices)
            if out.finished:
                break
        never()
        done.set()
        return tokens

    try:
        assert asyncio.run(run()) == 12
    finally:
        engine.stop()
    assert done.is_set()
    assert waits.count(True) == 1, waits  # one bounded wait, then the request ran its 12 steps
