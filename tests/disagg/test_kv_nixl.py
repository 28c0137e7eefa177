"""NIXL between two worker processes on this machine (UCX over shared memory / TCP on the CPU).

A prefill and a decode worker, both `--kv-transport nixl`, each register their KV cache with
their NIXL agent at start-up; the decode worker reads every span out of the prefill worker's
cache. Greedy and seeded outputs equal a unified engine's, with and without layer-wise push and
with a partial fetch (the decode worker's own cache holds the prompt's start); Info says the pair
used NIXL and nothing is left held on either side. Skipped where the nixl package does not import
(`pip install 'tandem[nixl]'`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from disagg_stack import Processes

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc


def _nixl_import_error() -> str:
    """kv_nixl.import_error(), asked in a child process: importing nixl loads UCX, whose memory
    hooks must not enter the test process (later native code in it crashed), only the workers'."""
    probe = "from services.worker import kv_nixl; print(kv_nixl.import_error())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() if done.returncode == 0 else f"the nixl probe failed: {done.stderr[-300:]}"


NIXL_IMPORT_ERROR = _nixl_import_error()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(NIXL_IMPORT_ERROR), reason=NIXL_IMPORT_ERROR or "nixl imports"),
]


@pytest.fixture(scope="module")
def workers(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("nixl"), stories_dir)
    try:
        procs.worker("prefill", "--role", "prefill", "--kv-transport", "nixl")
        procs.worker("decode", "--role", "decode", "--kv-transport", "nixl")
        for name in ("prefill", "decode"):
            wait_serving(procs, name)
        yield procs
    finally:
        procs.stop()


def wait_serving(procs: Processes, name: str, timeout_s: float = 120) -> None:
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(procs.address(name)))
    deadline = time.monotonic() + timeout_s
    while True:
        if procs.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{procs.log(name)}")
        try:
            stub.Info(worker_pb2.InfoRequest(), timeout=2)
            return
        except grpc.RpcError:
            assert time.monotonic() < deadline, procs.log(name)
            time.sleep(0.2)


def stub(procs: Processes, name: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(procs.address(name)))


def sampling_pb(sp: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=sp.temperature, max_tokens=sp.max_tokens or 0)
    if sp.seed is not None:
        msg.seed = sp.seed
    return msg


def run(procs: Processes, rid: str, prompt: list[int], sp: SamplingParams, layerwise: bool) -> list[int]:
    p, d = stub(procs, "prefill"), stub(procs, "decode")
    request = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_pb(sp))
    if layerwise:
        events = p.PrefillStream(request, timeout=60)
        handle, generated = next(events).handle, []
    else:
        reply = p.Prefill(request, timeout=60)
        handle, generated = reply.handle, list(reply.first.token_ids)
    tokens = list(generated)
    generate = worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=sampling_pb(sp),
        generated_token_ids=generated,
        kv_source=handle,
    )
    for chunk in d.Generate(generate, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
    if layerwise:
        list(events)  # the prefill's response
    return tokens


def test_nixl_between_two_worker_processes(workers: Processes, stories_dir: Path) -> None:
    p, d = stub(workers, "prefill"), stub(workers, "decode")
    for s in (p, d):
        assert worker_pb2.KV_TRANSPORT_NIXL in s.Info(worker_pb2.InfoRequest()).kv_transports
    reference = Engine(WorkerConfig(model=str(stories_dir), device="cpu", max_model_len=512, cpu_threads=1))
    prefix = [1, *range(40, 79)]  # 40 tokens: 2 full blocks, then warmed into D's cache
    prompts = [[1, *range(100, 171)], [*prefix, 300, 301, 302], [1, 7, 9], [*prefix, *range(200, 260)]]
    cases = [
        (f"{mode}-{layerwise}-{i}", prompt, sp, layerwise)
        for i, prompt in enumerate(prompts)
        for layerwise in (False, True)
        for mode, sp in (
            ("greedy", SamplingParams(temperature=0.0, max_tokens=10)),
            ("seeded", SamplingParams(temperature=1.0, seed=77 + i, max_tokens=10)),
        )
    ]
    run(workers, "warm", [*prefix, 5], SamplingParams(temperature=0.0, max_tokens=2), layerwise=False)
    for rid, prompt, sp, layerwise in cases:
        expected = reference.generate([prompt], sp, prefix=rid)[0].token_ids[0]
        assert run(workers, rid, prompt, sp, layerwise) == expected, rid
    peers = d.Info(worker_pb2.InfoRequest()).kv_peer_transfers
    nixl = [e for e in peers if e.transport == worker_pb2.KV_TRANSPORT_NIXL]
    assert len(nixl) == 1 and nixl[0].num_transfers == len(cases) + 1 and nixl[0].num_failed == 0, peers
    assert nixl[0].bytes > 0 and not [e for e in peers if e.transport != worker_pb2.KV_TRANSPORT_NIXL]
    deadline = time.monotonic() + 10
    while True:
        loads = [s.GetLoad(worker_pb2.GetLoadRequest()) for s in (p, d)]
        if all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads):
            break
        assert time.monotonic() < deadline, f"leaked blocks or handles: {loads}"
        time.sleep(0.05)
