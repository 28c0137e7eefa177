"""One worker process group = one gRPC worker: how its ranks start, talk and stop.

    rank 0     the `tandem worker` process: gRPC servicer, engine, scheduler, sampler, and its
               own slice of the model. Before each forward (and each LM-head call, each copy of
               KV blocks) it broadcasts the step's flat inputs to the other ranks (`StepDriver`).
    rank 1..   child processes of rank 0 (`spawn_ranks`), the same command line with
               TANDEM_TP_RANK set: they load their slice of the model, allocate their slice of
               the KV cache, then run `follow`: receive a command, run it, repeat. No gRPC.

The commands travel as pickled host objects over a gloo group of their own (`broadcast_object`);
the model's collectives run on the main group (NCCL on CUDA, gloo on CPU).

A rank that dies takes the group down: rank 0 watches its children and exits non-zero when one
exits (killing the rest), the children die with rank 0 (PR_SET_PDEATHSIG) or when a collective
with it fails, and every collective has the group's timeout, so no rank waits forever. While the
worker is idle, rank 0 broadcasts a ping every timeout / 4 so that idle ranks never time out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.worker import parallel
from services.worker.kv_cache import KVCache
from services.worker.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

RANK_ENV = "TANDEM_TP_RANK"
MASTER_ENV = "TANDEM_TP_MASTER"  # host:port of the group's rendezvous


# ---- commands (rank 0 -> the other ranks) ---------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """The flat inputs of one forward (AttentionMetadata's tensors on the host)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen_q: int
    num_decode_rows: int


@dataclass(frozen=True)
class Logits:
    hidden: torch.Tensor  # [S, hidden]: the rows whose logits rank 0 computes now


@dataclass(frozen=True)
class CopyBlocks:
    copies: list[tuple[int, int]]


@dataclass(frozen=True)
class BindKV:
    num_blocks: int


@dataclass(frozen=True)
class Profile:
    num_tokens: int
    num_seqs: int


@dataclass(frozen=True)
class Ping:
    pass


Command = Forward | Logits | CopyBlocks | BindKV | Profile | Ping


class StepDriver:
    """Rank 0's side: broadcasts each command before rank 0 runs it itself."""

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._detached = False
        self._interval = max(timeout_s / 4, 0.5)
        self._stop = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="tp-ping", daemon=True)
        self._pinger.start()

    def send(self, cmd: Command) -> None:
        if self._detached:
            return
        with self._lock:
            parallel.broadcast_object(cmd)
            self._last = time.monotonic()

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        self.send(
            Forward(
                input_ids.cpu(),
                meta.positions.cpu(),
                meta.slot_mapping.cpu(),
                meta.block_tables.cpu(),
                meta.cu_seqlens_q.cpu(),
                meta.seq_lens.cpu(),
                meta.max_seqlen_q,
                meta.num_decode_rows,
            )
        )

    def compute_logits(self, hidden: torch.Tensor) -> None:
        self.send(Logits(hidden.cpu()))

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Rank 0 runs the model without broadcasting (the others were told what to run)."""
        self._detached = True
        try:
            yield
        finally:
            self._detached = False

    def _ping_loop(self) -> None:
        while not self._stop.wait(self._interval / 2):
            if time.monotonic() - self._last >= self._interval and self._lock.acquire(blocking=False):
                try:
                    parallel.broadcast_object(Ping())
                    self._last = time.monotonic()
                except Exception as exc:  # a rank is gone (on another host no watcher sees it)
                    group_failed(exc)
                    return
                finally:
                    self._lock.release()

    def close(self) -> None:
        self._stop.set()


class DrivenKVCache(KVCache):
    """Rank 0's KV cache: a copy of blocks (copy-on-fork) happens on every rank."""

    driver: StepDriver | None = None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies and self.driver is not None:
            self.driver.send(CopyBlocks(copies))
        super().copy_blocks(copies)


# ---- the other ranks ----------------------------------------------------------------------------
def follow(config: object) -> int:
    """Ranks 1..T-1: load this rank's slice of the model, then run rank 0's commands forever."""
    from kernels import get_ops
    from services.worker.config import WorkerConfig
    from services.worker.engine import (
        resolve_device,
        resolve_dtype,
        resolve_kv_dtype,
        resolve_max_model_len,
    )
    from services.worker.model_config import load_model_config
    from services.worker.model_runner import ModelRunner

    assert isinstance(config, WorkerConfig)
    cfg = load_model_config(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    max_model_len = resolve_max_model_len(cfg, config.max_model_len)
    runner = ModelRunner(
        cfg,
        get_ops(config.attention_backend, device),
        device,
        dtype,
        max_model_len,
        config.block_size,
        config.load_format,
        config.seed,
    )
    model = runner.model
    kv: KVCache | None = None
    with torch.inference_mode():
        while True:
            cmd = parallel.broadcast_object()
            if isinstance(cmd, Forward):
                meta = AttentionMetadata(
                    positions=cmd.positions.to(device),
                    slot_mapping=cmd.slot_mapping.to(device),
                    block_tables=cmd.block_tables.to(device),
                    cu_seqlens_q=cmd.cu_seqlens_q.to(device),
                    seq_lens=cmd.seq_lens.to(device),
                    max_seqlen_q=cmd.max_seqlen_q,
                    cos_sin_cache=runner.cos_sin_cache,
                    num_decode_rows=cmd.num_decode_rows,
                )
                model(cmd.input_ids.to(device), meta)
            elif isinstance(cmd, Logits):
                if parallel.current().pp_rank == 0:  # stage 0 holds the LM head
                    model.compute_logits(cmd.hidden.to(device))
            elif isinstance(cmd, CopyBlocks):
                assert kv is not None
                kv.copy_blocks(cmd.copies)
            elif isinstance(cmd, BindKV):
                kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype)
                kv = KVCache(cfg, cmd.num_blocks, config.block_size, kv_dtype, device)
                runner.bind_kv_cache(kv)
            elif isinstance(cmd, Profile):
                runner.profile_peak_bytes(cmd.num_tokens, cmd.num_seqs)


# ---- starting the group (rank 0) ----------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The child gets SIGKILL when rank 0 dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RankProcesses:
    """Ranks 1..T-1 as child processes of rank 0, watched: one that exits takes the group down."""

    def __init__(self, argv: list[str], num_local: int, master: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._closing = False
        for rank in range(1, num_local):
            env = dict(os.environ, **{RANK_ENV: str(rank), MASTER_ENV: master})
            cmd = [sys.executable, "-m", "services.worker.main", *argv]
            self.procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"tp-watch-{rank}", daemon=True
            ).start()

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._closing:
            return
        log.error("tensor-parallel rank %d exited (code %s): taking the worker group down", rank, code)
        self.terminate()
        logging.shutdown()
        os._exit(1)  # the engine thread may be inside a collective with the dead rank

    def terminate(self) -> None:
        self._closing = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


def check_group(config: object) -> None:
    """One-line errors (ModelConfigError) for a group that cannot work, before any weight loads."""
    from services.worker.config import WorkerConfig
    from services.worker.engine import resolve_device
    from services.worker.model_config import ModelConfigError, load_model_config

    assert isinstance(config, WorkerConfig)
    t = config.tensor_parallel_size
    cfg = load_model_config(config.model)
    parallel.check_tp_size(cfg, t)
    parallel.check_pp_size(cfg, config.pipeline_parallel_size)
    per_node = config.world_size // config.nnodes
    device = resolve_device(config.device)
    if device.type == "cuda":
        if device.index not in (None, 0) and config.device != "cuda":
            raise ModelConfigError(
                f"--device {config.device} with --tensor-parallel-size {t}: rank r uses cuda:r; "
                "give --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if torch.cuda.device_count() < per_node:
            raise ModelConfigError(
                f"{config.world_size} ranks over {config.nnodes} node(s) need {per_node} GPUs per host, "
                f"this host shows {torch.cuda.device_count()}"
            )


def group_failed(exc: BaseException) -> None:
    """A step of a tensor-parallel group raised (a collective with a dead or stuck rank): the group
    cannot go on, so this process exits and its ranks with it; `tandem up` restarts the worker."""
    log.error("tensor-parallel step failed (%s): taking the worker group down", exc)
    logging.shutdown()
    os._exit(1)


@dataclass(frozen=True)
class GroupMember:
    """This process in its group: `local` = the ranks it started (their handle), `driver` = rank 0."""

    local: RankProcesses | None
    driver: bool


def start_group(config: object, argv: list[str]) -> GroupMember:
    """Join this process's tensor-parallel group. The first process of a node (no TANDEM_TP_RANK)
    checks the layout and starts the node's other ranks; global rank 0 serves, the rest `follow`.
    Node n holds ranks n * T / nnodes .. (n + 1) * T / nnodes - 1 (cuda:0.. in that order)."""
    from services.worker.config import WorkerConfig

    assert isinstance(config, WorkerConfig)
    t, p = config.tensor_parallel_size, config.pipeline_parallel_size
    per_node = config.world_size // config.nnodes
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
        torch.device("cuda", local_rank)
        if config.device != "cpu" and torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    host, _, port = master.rpartition(":")
    parallel.init_process_group(rank, t, p, host, int(port), device, config.distributed_timeout)
    log.info("rank %d of %d (T=%d x P=%d) joined (%s)", rank, t * p, t, p, device)
    return GroupMember(local, rank == 0)


def follow_until_down(config: object, local: RankProcesses | None) -> int:
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
