"""`--distributed-executor-backend ray`: a worker group's ranks 1..W-1 as Ray actors.

Rank 0 stays in the `tandem worker` process (gRPC servicer, engine, scheduler, sampler), exactly as
with the default launcher (`RankProcesses`, services/worker/tp_group.py); only where the other
ranks run changes. The ranks are placed with one Ray placement group, one bundle per rank
(`{"GPU": 1, "CPU": 1}` on CUDA, `{"CPU": 1}` on the CPU), packed per node; bundle 0 is pinned to
rank 0's node and, on CUDA, held by a placeholder actor whose GPU rank 0 uses, so that Ray's
accounting matches the GPUs the group really takes. Each rank actor joins the same
torch.distributed group as today (rank 0's node address, a free port) and runs
`tp_follow.follow`: rank 0's broadcast commands, until the group goes down.

Failure semantics are the default launcher's: rank 0 waits on every actor's `run` call in a
thread, and the first that ends (the actor's process died, was killed, or its collective failed)
takes the group down (the other actors are killed, rank 0 exits 1, `tandem up` restarts it). The
actors die with rank 0: Ray kills an actor whose owner (this process) is gone, and a local cluster
started here (no --ray-address) is shut down with the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from services.worker.config import WorkerConfig
from services.worker.model_config import ModelConfigError

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ModelConfigError(
            "--distributed-executor-backend ray needs the ray package: pip install 'tandem[ray]'"
        ) from exc
    return ray


class RankActor:
    """One non-zero rank in a Ray worker process (wrapped by `ray.remote` in `RayRanks`)."""

    def gpu_ids(self) -> list[int]:
        """The GPUs Ray gave this actor (the placeholder of rank 0's bundle: the GPU rank 0 uses)."""
        import ray

        return [int(g) for g in ray.get_gpu_ids()]

    def run(self, argv: list[str], cwd: str, rank: int, master_addr: str, master_port: int) -> None:
        """Join the group as `rank`, then follow rank 0's commands until the group goes down."""
        import ray

        if os.path.isdir(cwd):  # rank 0's relative paths (--model) mean the same here, on a shared disk
            os.chdir(cwd)

        from services.common.config import parse_config
        from services.common.logging import setup_logging
        from services.worker import parallel
        from services.worker.tp_follow import follow

        config = parse_config(WorkerConfig, argv, "tandem worker")
        setup_logging(config.log_level, config.log_format, "tandem.worker")
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's one GPU
        device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        t, p = config.tensor_parallel_size, config.pipeline_parallel_size
        parallel.init_process_group(
            rank,
            t,
            p,
            master_addr,
            master_port,
            device,
            config.distributed_timeout,
            config.distributed_backend,
        )
        log.info("rank %d of %d (T=%d x P=%d) joined as a Ray actor (%s)", rank, t * p, t, p, device)
        try:
            follow(config)
        except Exception as exc:  # the group is gone (rank 0 exited, or another rank died)
            log.error("tensor-parallel rank %d left its group: %s", rank, exc)
        logging.shutdown()
        os._exit(1)  # free this actor's GPU at once; rank 0 sees the actor die


@dataclass(frozen=True)
class Placement:
    """Where rank 0 runs: its node's address and a free port there (the group's rendezvous), its device."""

    master_addr: str
    master_port: int
    device: torch.device


class RayRanks:
    """Ranks 1..W-1 as Ray actors, watched: one that ends takes the group down (like `RankProcesses`)."""

    def __init__(self, config: WorkerConfig, argv: list[str]) -> None:
        self._ray = ray = import_ray()
        self._closing = False
        self._terminate_lock = threading.Lock()  # the watcher and a failed step may both stop the group
        self.actors: list[Any] = []
        world = config.world_size
        cuda = config.device != "cpu" and torch.cuda.is_available()
        # a local cluster (no --ray-address) is this process's: stopped with the group
        self._local = not config.ray_address and not ray.is_initialized()
        if not ray.is_initialized():
            try:
                if config.ray_address:
                    ray.init(address=config.ray_address)
                else:
                    ray.init(include_dashboard=False)
            except Exception as exc:  # unreachable, refused (auth), a local start that failed
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                where = config.ray_address or "a local Ray cluster"
                raise ModelConfigError(
                    f"--distributed-executor-backend ray: cannot start or join {where}: {first}"
                ) from exc
        node_id = ray.get_runtime_context().get_node_id()
        (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
        master_addr = str(node["NodeManagerAddress"])
        # nodes may still be joining (pods starting): wait for them up to --distributed-timeout
        self._wait_for_resources(world, cuda, config.distributed_timeout)
        bundle = {"GPU": 1.0, "CPU": 1.0} if cuda else {"CPU": 1.0}
        # bundle 0 is rank 0's, on this node (the `node:<ip>` resource every Ray node has)
        bundles = [{**bundle, f"node:{master_addr}": 0.001}] + [dict(bundle) for _ in range(world - 1)]
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._pg = placement_group(bundles, strategy="PACK")
        self._remove_pg = remove_placement_group
        ready, _ = ray.wait([self._pg.ready()], timeout=config.distributed_timeout)
        if not ready:  # enough in all, but taken by others, or none left on this node for rank 0
            self.terminate()
            raise ModelConfigError(
                f"the Ray cluster could not place the group's {world} ranks ({bundle} each, one on this "
                f"node) within --distributed-timeout {config.distributed_timeout:g}s: {self._resources_text()}"
            )
        actor_cls = ray.remote(RankActor)

        def on_bundle(i: int, gpus: float) -> Any:
            return actor_cls.options(
                num_cpus=1,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=i
                ),
            )

        device = torch.device("cpu")
        if cuda:  # a placeholder holds bundle 0's GPU; rank 0 (this process) computes on it
            self._placeholder = on_bundle(0, 1).remote()
            self.actors.append(self._placeholder)
            device = torch.device("cuda", ray.get(self._placeholder.gpu_ids.remote())[0])
        from services.worker import parallel

        master_port = parallel.free_port(master_addr)
        self._runs: dict[Any, int] = {}
        for rank in range(1, world):
            actor = on_bundle(rank, 1 if cuda else 0).remote()
            self.actors.append(actor)
            self._runs[actor.run.remote(argv, os.getcwd(), rank, master_addr, master_port)] = rank
        self.placement = Placement(master_addr, master_port, device)
        threading.Thread(target=self._watch, name="tp-ray-watch", daemon=True).start()

    def _resources_text(self) -> str:
        total = self._ray.cluster_resources()
        return f"the cluster has {total.get('GPU', 0):g} GPU(s) and {total.get('CPU', 0):g} CPU(s) in all"

    def _wait_for_resources(self, world: int, cuda: bool, timeout_s: float) -> None:
        """A cluster too small for the group (in all, used or not) after `timeout_s` is a one-line error."""
        kind = "GPU" if cuda else "CPU"
        deadline = time.monotonic() + timeout_s
        while (have := self._ray.cluster_resources().get(kind, 0)) < world:
            if time.monotonic() >= deadline:
                self.terminate()
                raise ModelConfigError(
                    f"the Ray cluster has {have:g} {kind}(s), the group's {world} ranks "
                    f"(--tensor-parallel-size x --pipeline-parallel-size) need {world}, one each"
                )
            log.info("waiting for Ray nodes: the cluster has %g %s(s), the group needs %d", have, kind, world)
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))  # not past the deadline

    def _watch(self) -> None:
        ray = self._ray
        ready, _ = ray.wait(list(self._runs), num_returns=1)
        if self._closing:
            return
        rank = self._runs[ready[0]]
        try:
            ray.get(ready[0])
            why = "left the group"
        except Exception as exc:  # RayActorError: its process died or was killed
            why = f"died ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        log.error("tensor-parallel rank %d (Ray actor) %s: taking the worker group down", rank, why)
        self.terminate()
        logging.shutdown()
        os._exit(1)  # the engine thread may be inside a collective with the dead rank

    def terminate(self) -> None:
        with self._terminate_lock:
            if not self._closing:
                self._stop()

    def _stop(self) -> None:
        self._closing = True
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(actor)
        pg = getattr(self, "_pg", None)
        if pg is not None:
            with contextlib.suppress(Exception):
                self._remove_pg(pg)
        if self._local:  # its processes outlive an os._exit of this one otherwise (Ray's agents)
            with contextlib.suppress(Exception):
                self._ray.shutdown()
