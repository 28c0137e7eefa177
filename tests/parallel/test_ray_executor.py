"""`--distributed-executor-backend ray` on a local CPU Ray cluster (`ray start --head` on this
machine, started and cleaned up here): a T = 2 worker serves greedy tokens equal to transformers
over gRPC, a T = 2 x P = 2 group's engine equals them too, a killed rank actor takes the worker
down with a clear error, and a cluster too small for the group is a clear error before loading."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from services.common.config import parse_config
from services.common.server import wait_for_serving
from services.worker.config import WorkerConfig
from tandem.up import UpConfig, forwarded_worker_args
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import UpProcess, alive, children_by_role, free_port, http_status
from tests.parallel.conftest import run_group
from tests.worker.worker_testlib import RefModel, load_ref, prompts_of_lengths

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
NUM_CPUS = 4  # T = 2 x P = 2 fits; T = 4 x P = 2 does not
# no usage report, and no auth token file to share between the cluster and the worker
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class Cluster:
    address: str
    pgid: int  # `ray start --block` and every process it starts (GCS, raylet, rank actors)
    temp_dir: str


def _env() -> dict[str, str]:
    return {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _processes() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent pid, process group, command line) of every live process."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat[0] != "Z":
            procs[int(entry.name)] = (int(stat[1]), int(stat[2]), cmdline)
    return procs


def _cluster_pids(cluster: Cluster) -> list[int]:
    """Live processes of the cluster: in its process group, below `ray start`, or naming its folder."""
    procs = _processes()
    ours = {
        pid
        for pid, (_, pgid, cmd) in procs.items()
        if pgid == cluster.pgid or cluster.temp_dir.encode() in cmd
    }
    grew = True
    while grew:  # and their descendants (the raylet's workers, whatever their session)
        below = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours} - ours
        ours |= below
        grew = bool(below)
    return sorted(ours)


def _wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s}s")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # short: Ray's unix sockets live in it
    port = free_port()
    log = Path(temp_dir) / "start.log"
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--port", str(port), "--num-cpus", str(NUM_CPUS)]
    cmd += ["--num-gpus", "0", "--include-dashboard=false", "--temp-dir", temp_dir]
    cmd += ["--ray-client-server-port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = Cluster(f"127.0.0.1:{port}", proc.pid, temp_dir)
    try:
        _wait_until(
            lambda: b"Ray runtime started" in log.read_bytes() or proc.poll() is not None, 90, "ray start"
        )
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        yield cluster
    finally:
        # only what this fixture started (its processes by id); SIGKILL: a graceful `ray stop` waits
        # on the GCS it is stopping. Killed twice: a raylet may start a worker while the first round runs.
        for _ in range(2):
            for pid in _cluster_pids(cluster):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(AssertionError):
                _wait_until(lambda: not _cluster_pids(cluster), 10, "the Ray cluster's processes exit")
        proc.wait(timeout=10)
        assert not _cluster_pids(cluster), "stray Ray processes after the test"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _worker(
    model: Path, sock: Path, log: Path, cluster: Cluster, *extra: str, timeout_s: int = 60
) -> subprocess.Popen[bytes]:
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
    args += ["--cpu-threads", "1", "--distributed-timeout", str(timeout_s)]
    args += ["--distributed-executor-backend", "ray"]
    args += ["--ray-address", cluster.address, *extra]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "worker", *args],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _rank_actor_pids(cluster: Cluster) -> list[int]:
    pids = []
    for pid in _cluster_pids(cluster):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RankActor"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_t2_serves_greedy_tokens_and_a_killed_rank_actor_takes_it_down(
    ray_cluster: Cluster, tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    ref, sock, log = tp_refs["llama_gqa"], tmp_path / "w.sock", tmp_path / "worker.log"
    proc = _worker(ref.path, sock, log, ray_cluster, "--tensor-parallel-size", "2")
    try:
        asyncio.run(wait_for_serving(f"unix:{sock}", timeout_s=120))
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            assert stub.Info(worker_pb2.InfoRequest()).tensor_parallel_size == 2
            for prompt in ([1, 17, 99, 203, 4], [5, 9]):
                req = worker_pb2.GenerateRequest(
                    request_id="r",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8),
                )
                chunks = stub.Generate(req, timeout=60)
                assert [t for c in chunks for ch in c.choices for t in ch.token_ids] == ref.greedy(prompt, 8)
        (actor,) = _rank_actor_pids(ray_cluster)  # rank 1, the group's one actor
        os.kill(actor, signal.SIGKILL)
        _wait_until(lambda: proc.poll() is not None, 30, "the worker exits")  # at once, not a timeout
        assert proc.returncode == 1
        assert "tensor-parallel rank 1 (Ray actor) died" in log.read_text(errors="replace")
        _wait_until(lambda: not alive(actor), 10, "the killed actor is reaped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_t2_p2_group_equals_transformers(
    ray_cluster: Cluster, tp_refs: dict[str, RefModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tp_refs["llama_gqa"]
    prompts = prompts_of_lengths([1, 7, 17, 29], ref.vocab_size, seed=5)
    options = ["--model", str(ref.path), "--device", "cpu", "--kv-cache-memory", "4MiB", "--cpu-threads", "1"]
    options += [
        "--max-num-batched-tokens",
        "16",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
    ]
    options += ["--distributed-executor-backend", "ray", "--ray-address", ray_cluster.address]
    for key, value in RAY_ENV.items():  # run_group's subprocess takes this environment
        monkeypatch.setenv(key, value)
    got = run_group(tmp_path, {"prompts": prompts, "max_tokens": 6}, *options, timeout_s=120)
    for i, prompt in enumerate(prompts):
        assert got["tokens"][i]["0"] == ref.greedy(prompt, 6)
    # the actors went down with the group (Ray kills an owner's actors): the cluster is free again
    _wait_until(lambda: not _rank_actor_pids(ray_cluster), 30, "the rank actors exit")


def test_cluster_too_small_is_a_clear_error(
    ray_cluster: Cluster, tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    ref, log = tp_refs["llama_gqa"], tmp_path / "worker.log"
    options = ["--tensor-parallel-size", "4", "--pipeline-parallel-size", "2"]
    # 3 s for more nodes to join, then the error
    proc = _worker(ref.path, tmp_path / "w.sock", log, ray_cluster, *options, timeout_s=3)
    assert proc.wait(timeout=90) == 2
    last = log.read_text(errors="replace").strip().splitlines()[-1]
    assert f"the Ray cluster has {NUM_CPUS} CPU(s), the group's 8 ranks" in last


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ray_address": "10.0.0.1:6379"}, "--ray-address is for --distributed-executor-backend ray"),
        (
            {"distributed_executor_backend": "ray", "tensor_parallel_size": 2, "nnodes": 2, "master_port": 1},
            "Ray places the ranks on its nodes itself",
        ),
    ],
)
def test_bad_ray_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerConfig(model="m", **options)


def test_up_forwards_the_ray_backend_to_its_workers() -> None:
    up = parse_config(UpConfig, ["--model", "m", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
                                 "--ray-address", "10.0.0.1:6379"], "tandem up")  # fmt: skip
    worker = parse_config(WorkerConfig, ["--model", "m", *forwarded_worker_args(up)], "tandem worker")
    assert (worker.distributed_executor_backend, worker.ray_address) == ("ray", "10.0.0.1:6379")
    assert worker.tensor_parallel_size == 2
    default = parse_config(UpConfig, ["--model", "m"], "tandem up")
    assert "--distributed-executor-backend" not in forwarded_worker_args(default)


def _descendants(root: int) -> set[int]:
    procs, found = _processes(), {root}
    grew = True
    while grew:
        below = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        found |= below
        grew = bool(below)
    return found - {root}


@pytest.mark.slow
def test_local_cluster_without_an_address_goes_away_with_the_group(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """No --ray-address: the worker starts its own Ray cluster; when a rank actor dies the worker
    exits 1 and every process of that cluster (GCS, raylet, Ray's agents) goes with it."""
    ref, sock, log = tp_refs["llama_gqa"], tmp_path / "w.sock", tmp_path / "worker.log"
    args = [
        "--model",
        str(ref.path),
        "--address",
        f"unix:{sock}",
        "--device",
        "cpu",
        "--kv-cache-memory",
        "4MiB",
    ]
    args += ["--cpu-threads", "1", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
    ray_tmp = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # the local cluster's files (short: sockets)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "worker", *args],
            cwd=REPO,
            env={**_env(), "RAY_TMPDIR": ray_tmp},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    cluster: set[int] = set()
    try:
        asyncio.run(wait_for_serving(f"unix:{sock}", timeout_s=120))
        cluster = _descendants(proc.pid)
        procs = _processes()
        (actor,) = [pid for pid in cluster if procs[pid][2].startswith(b"ray::RankActor")]
        os.kill(actor, signal.SIGKILL)
        _wait_until(lambda: proc.poll() is not None, 60, "the worker exits")
        assert proc.returncode == 1
        assert "tensor-parallel rank 1 (Ray actor) died" in log.read_text(errors="replace")
        _wait_until(lambda: not any(alive(pid) for pid in cluster), 30, "the local Ray cluster exits")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in cluster:  # what it started, if the test failed before they all exited
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.e2e
def test_up_with_the_ray_backend_serves_and_restarts_a_group_after_a_dead_actor(
    ray_cluster: Cluster, stories_dir: Path
) -> None:
    """`tandem up --distributed-executor-backend ray`: the OpenAI API's greedy text is the model's;
    a killed rank actor takes the worker down, `up` restarts it, a fresh group is placed on the
    cluster and later requests succeed."""
    up = UpProcess(
        stories_dir,
        "--tensor-parallel-size",
        "2",
        "--distributed-executor-backend",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--device",
        "cpu",
        "--worker-args",
        "--kv-cache-memory 8MiB --cpu-threads 1",
        env={**RAY_ENV, "OMP_NUM_THREADS": "1"},
    )
    try:
        up.wait_healthy(240)
        oai = OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
        prompt = [1, 403, 407, 261, 378]
        tokenizer = Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
        expected = tokenizer.decode(load_ref(stories_dir).greedy(prompt, 12))
        first = oai.completions.create(model="stories260K", prompt=prompt, max_tokens=12, temperature=0)
        assert first.choices[0].text == expected
        worker = children_by_role(up.process.pid)["worker"]
        (actor,) = _rank_actor_pids(ray_cluster)
        os.kill(actor, signal.SIGKILL)
        _wait_until(
            lambda: (
                children_by_role(up.process.pid).get("worker") not in (None, worker)
                and http_status(up.url + "/health") == 200
                and len(_rank_actor_pids(ray_cluster)) == 1
            ),
            180,
            "up restarts the worker group",
        )
        assert "tensor-parallel rank 1 (Ray actor) died" in up.output()
        again = oai.with_options(timeout=60).completions.create(
            model="stories260K", prompt=prompt, max_tokens=12, temperature=0
        )
        assert again.choices[0].text == expected
    finally:
        assert up.stop() == 0
