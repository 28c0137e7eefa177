"""Starting a worker group's process (any rank) and the life of ranks 1..T*P-1.

`start_group` joins this process to its group (the first process of a host starts the host's
other ranks, services/worker/tp_group.py `RankProcesses`); rank 0 then builds the engine and
serves, every other rank runs `follow`: rank 0's commands, until the group goes down.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from services.worker import parallel
from services.worker.config import WorkerConfig
from services.worker.engine import resolve_device
from services.worker.layers.quantization.tensor_parallel import check_quantization
from services.worker.model_config import ModelConfigError, load_model_config
from services.worker.ray_executor import RayRanks
from services.worker.tp_follow import follow
from services.worker.tp_group import (
    MASTER_ENV,
    RANK_ENV,
    RankProcesses,
    on_group_failure,
)

log = logging.getLogger(__name__)


def check_group(config: WorkerConfig) -> None:
    """One-line errors (ModelConfigError) for a group that cannot work, before any weight loads."""
    t = config.tensor_parallel_size
    cfg = load_model_config(config.model)
    parallel.check_architecture(cfg, config.world_size)
    parallel.check_tp_size(cfg, t)
    parallel.check_pp_size(cfg, config.pipeline_parallel_size)
    check_quantization(cfg, t, config.quantization, config.quantization_group_size)
    per_node = config.world_size // config.nnodes
    device = resolve_device(config.device)
    if device.type == "cuda" and config.distributed_executor_backend == "mp":  # Ray counts its own GPUs
        if device.index not in (None, 0) and config.device != "cuda":
            raise ModelConfigError(
                f"--device {config.device} with --tensor-parallel-size {t}: rank r uses cuda:r; "
                "give --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        gloo = parallel.resolve_backend(config.distributed_backend, device) == "gloo"
        if torch.cuda.device_count() < per_node and not gloo:  # (gloo's ranks may share a GPU)
            raise ModelConfigError(
                f"{config.world_size} ranks over {config.nnodes} node(s) need {per_node} GPUs per host, "
                f"this host shows {torch.cuda.device_count()} (NCCL refuses two ranks on one GPU; "
                "--distributed-backend gloo lets them share, slowly)"
            )


@dataclass(frozen=True)
class GroupMember:
    """This process in its group: `local` = the ranks it started (their handle), `driver` = rank 0."""

    local: RankProcesses | RayRanks | None
    driver: bool


def start_group(config: WorkerConfig, argv: list[str]) -> GroupMember:
    """Join this process's tensor-parallel group. The first process of a node (no TANDEM_TP_RANK)
    checks the layout and starts the node's other ranks; global rank 0 serves, the rest `follow`.
    Node n holds ranks n * T / nnodes .. (n + 1) * T / nnodes - 1 (cuda:0.. in that order)."""
    t, p = config.tensor_parallel_size, config.pipeline_parallel_size
    per_node = config.world_size // config.nnodes
    if config.distributed_executor_backend == "ray":
        return _start_ray_group(config, argv)
    local_rank = int(os.environ.get(RANK_ENV, "0"))
    rank = config.node_rank * per_node + local_rank
    local: RankProcesses | None = None
    if local_rank == 0:
        check_group(config)
        rdv_port = config.master_port or parallel.free_port()
        master = f"{config.master_addr}:{rdv_port}"
        local = RankProcesses(argv, per_node, master)
    else:
        master = os.environ[MASTER_ENV]
    device = (
        torch.device("cuda", local_gpu(config, local_rank))
        if config.device != "cpu" and torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    host, _, port = master.rpartition(":")
    parallel.init_process_group(
        rank, t, p, host, int(port), device, config.distributed_timeout, config.distributed_backend
    )
    log.info("rank %d of %d (T=%d x P=%d) joined (%s)", rank, t * p, t, p, device)
    return GroupMember(local, rank == 0)


def local_gpu(config: WorkerConfig, local_rank: int) -> int:
    """The CUDA device of this host's rank `local_rank`: its own GPU (cuda:local_rank), or with
    gloo and fewer GPUs than ranks the GPUs in turn (two ranks on one GPU: an agreement run of a
    T = 2 group where only one GPU is lent; NCCL refuses two ranks on one device)."""
    count = torch.cuda.device_count()
    if parallel.resolve_backend(config.distributed_backend, "cuda") == "gloo" and count:
        return local_rank % count
    return local_rank


def _start_ray_group(config: WorkerConfig, argv: list[str]) -> GroupMember:
    """Rank 0 here, ranks 1..W-1 as Ray actors (services/worker/ray_executor.py)."""
    check_group(config)
    ranks = RayRanks(config, argv)
    on_group_failure(ranks.terminate)
    where = ranks.placement
    if where.device.type == "cuda":
        torch.cuda.set_device(where.device)
    t, p = config.tensor_parallel_size, config.pipeline_parallel_size
    parallel.init_process_group(
        0,
        t,
        p,
        where.master_addr,
        where.master_port,
        where.device,
        config.distributed_timeout,
        config.distributed_backend,
    )
    log.info("rank 0 of %d (T=%d x P=%d) joined, ranks 1.. are Ray actors (%s)", t * p, t, p, where.device)
    return GroupMember(ranks, True)


def follow_until_down(config: WorkerConfig, local: RankProcesses | RayRanks | None) -> int:
    """A non-zero rank's life: `follow` until a collective fails (rank 0 gone), then exit non-zero
    with the ranks this process started (the first process of a headless node)."""
    try:
        follow(config)
    except Exception as exc:  # the group is gone; nothing here can recover it
        log.error("tensor-parallel rank left its group: %s", exc)
    finally:
        if local is not None:
            local.terminate()
    return 1
