"""`tandem worker --tensor-parallel-size 2` as real processes: it serves over gRPC, Info reports
the group, a bad layout is a one-line error before any weight loads, and a rank that dies takes
the whole group down promptly (no rank left waiting in a collective)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.server import wait_for_serving
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import alive, child_pids
from tests.worker.worker_testlib import RefModel

REPO = Path(__file__).resolve().parents[2]


def _start(model: Path, sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [
        "--model",
        str(model),
        "--address",
        f"unix:{sock}",
        "--device",
        "cpu",
        "--kv-cache-memory",
        "4MiB",
    ]
    args += ["--cpu-threads", "1", "--distributed-timeout", "60", *extra]
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)


@pytest.fixture
def group(tp_refs: dict[str, RefModel], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    sock = tmp_path / "w.sock"
    proc = _start(tp_refs["llama_gqa"].path, sock, "--tensor-parallel-size", "2")
    try:
        asyncio.run(wait_for_serving(f"unix:{sock}", timeout_s=180))
        yield proc, f"unix:{sock}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_exit(proc: subprocess.Popen[bytes] | int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (proc.poll() is not None) if isinstance(proc, subprocess.Popen) else not alive(proc):
            return
        time.sleep(0.1)
    raise AssertionError(f"still running after {timeout_s}s")


def test_serves_reports_and_goes_down_with_a_killed_rank(
    group: tuple[subprocess.Popen[bytes], str], tp_refs: dict[str, RefModel]
) -> None:
    proc, address = group
    ref = tp_refs["llama_gqa"]
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.Info(worker_pb2.InfoRequest())
        assert info.tensor_parallel_size == 2
        assert info.kv_layout.num_kv_heads == 1  # this rank's share of the 2 KV heads
        prompt = [1, 17, 99, 203, 4]
        req = worker_pb2.GenerateRequest(
            request_id="r",
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8),
        )
        tokens = [t for chunk in stub.Generate(req, timeout=60) for c in chunk.choices for t in c.token_ids]
        assert tokens == ref.greedy(prompt, 8)
    (rank1,) = child_pids(proc.pid)
    os.kill(rank1, signal.SIGKILL)
    _wait_exit(proc, 30)  # rank 0 notices at once (it watches its ranks), not after a timeout
    assert proc.returncode != 0


@pytest.mark.slow
def test_killed_rank_0_takes_the_other_ranks_down(group: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, _ = group
    (rank1,) = child_pids(proc.pid)
    proc.kill()
    proc.wait()
    _wait_exit(rank1, 30)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--tensor-parallel-size", "3"), "--tensor-parallel-size 3 does not divide the 4 attention heads"),
        (("--pipeline-parallel-size", "3"), "--pipeline-parallel-size 3 is larger than the 2 layers"),
    ],
)
def test_bad_layout_is_a_one_line_error_before_loading(
    tp_refs: dict[str, RefModel], option: tuple[str, str], message: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tandem.cli", "worker", "--model", str(tp_refs["llama_gqa"].path)]
    proc = subprocess.run(
        [*cmd, "--device", "cpu", *option], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]


def test_two_nodes_on_one_machine_serve_and_go_down_together(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """--nnodes 2: node 0 serves gRPC, node 1 runs headless; both meet at --master-addr/port."""
    from tests.e2e.stack import free_port

    ref, sock, port = tp_refs["llama_gqa"], tmp_path / "w.sock", str(free_port())
    common = [
        "--tensor-parallel-size",
        "2",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
    ]
    node0 = _start(ref.path, sock, *common, "--node-rank", "0")
    node1 = _start(ref.path, tmp_path / "unused.sock", *common, "--node-rank", "1")
    try:
        asyncio.run(wait_for_serving(f"unix:{sock}", timeout_s=180))
        assert not (tmp_path / "unused.sock").exists()  # headless: no gRPC server on node 1
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            assert stub.Info(worker_pb2.InfoRequest()).tensor_parallel_size == 2
            prompt = [1, 8, 77, 150]
            req = worker_pb2.GenerateRequest(
                request_id="r",
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6),
            )
            tokens = [
                t for chunk in stub.Generate(req, timeout=60) for c in chunk.choices for t in c.token_ids
            ]
            assert tokens == ref.greedy(prompt, 6)
        # No parent watches a rank on another host: rank 0's next ping of the idle group fails
        # (one a second; it was one every --distributed-timeout / 4, here 15 s).
        node1.kill()
        _wait_exit(node0, 10)
        assert node0.returncode != 0
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_family_without_parallel_modules_is_a_one_line_error(tmp_path: Path) -> None:
    """Gemma 2 has its own modules (not the sharded ones): refused before any weight loads."""
    from tests.worker.worker_testlib import TINY_BUILDERS

    TINY_BUILDERS["gemma2"]().save_pretrained(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tandem.cli", "worker", "--model", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, "--tensor-parallel-size", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Gemma2ForCausalLM cannot be split over several ranks yet" in lines[0], (
        proc.stderr
    )
