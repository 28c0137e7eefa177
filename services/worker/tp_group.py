"""One worker process group = one gRPC worker: how its ranks start, talk and stop.

    rank 0     the `tandem worker` process: gRPC servicer, engine, scheduler, sampler, and its
               own slice of the model. Before each forward (and each LM-head call, each copy of
               KV blocks) it broadcasts the step's flat inputs to the other ranks (`StepDriver`).
    rank 1..   child processes of rank 0 (`RankProcesses`), the same command line with
               TANDEM_TP_RANK set: they load their slice of the model, allocate their slice of
               the KV cache, then run `tp_follow.follow`: receive a command, run it, repeat.

The commands travel as pickled host objects over a gloo group of their own (`broadcast_object`;
with pipeline batches in flight as queued point-to-point sends that rank 0 does not wait for,
`parallel.queue_commands`);
the model's collectives run on the main group (NCCL on CUDA, gloo on CPU). Disaggregation's KV
moves within the group after a ReadKV / WriteKV command, point to point on the gloo group
(kv_reshard.py).

Speculative decoding (docs/speculative.md): a draft model or EAGLE head runs on rank 0 alone,
unsharded; the verification forward is a plain `Forward` with K + 1 tokens per drafted row. An
EAGLE head's use of the target's vocabulary-parallel embedding is an `Embed` command.

LoRA adapters (docs/lora.md): a load on rank 0 (start-up or LoadLoRA) is a `LoadLoRA` command,
each rank reading its own shard of the files, and the ranks' answers are gathered so that one
rank's failure fails the load everywhere. Each forward carries the step's slot refills and row
mapping (`LoRAStep`), decided by rank 0's pool. An unloaded adapter may still be needed by the
requests that were running with it, so the other ranks drop their shard only once rank 0's copy is
gone (a finalizer; the ids ride on the next forward).

The host KV tier (--kv-offload-memory, kv_offload.py): every rank holds a host buffer of the same
slot count for its own shard. Rank 0's tier makes each copy between the cache and host memory at
once and stages it here (`stage_host_kv`); the pending copies ride on the next Forward, or go as a
`HostKVCopies` command of their own ahead of any other command (a block copy, a disaggregation
read or write), so every rank makes them in rank 0's order before whatever reads or overwrites
those blocks.

A rank that dies takes the group down: rank 0 watches its children and exits non-zero when one
exits (killing the rest), the children die with rank 0 (PR_SET_PDEATHSIG) or when a collective
with it fails, and every collective has the group's timeout, so no rank waits forever. While the
worker is idle, rank 0 broadcasts a ping every timeout / 4 so that idle ranks never time out; every
second when some ranks run on other hosts (--nnodes > 1), so that the loss of one is noticed at once.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import torch

from services.worker import kv_reshard, parallel
from services.worker.kv_cache import KVCache
from services.worker.kv_reshard import ReadKV, WriteKV
from services.worker.layers.attention import AttentionMetadata
from services.worker.lora.adapter import LoRAAdapterError
from services.worker.model_config import ModelConfig

if TYPE_CHECKING:
    from services.worker.kv_offload import HostCopy
    from services.worker.lora.adapter import LoRAAdapter
    from services.worker.lora.pool import LoRAStep

log = logging.getLogger(__name__)

PING_INTERVAL_S = 1.0  # rank 0's ping of idle ranks on other hosts (StepDriver)

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
    lora: LoRAStep | None = None  # the step's LoRA slot refills and row mapping (LoRA on)
    released_loras: tuple[int, ...] = ()  # lora_ids rank 0 no longer holds: drop their shards
    host_kv: tuple[HostCopy, ...] = ()  # the host KV tier's copies rank 0 made since the last command
    # > 0: a decode step rank 0 runs as its CUDA graph of this (padded) batch size; every rank
    # replays its own graph of that size, so the graphs' collectives line up (0: eager forward)
    graph_size: int = 0


@dataclass(frozen=True)
class CaptureGraphs:
    """Capture the decode CUDA-graph ladder (cuda_graph.py), as rank 0 does meanwhile: every rank
    captures the same sizes in the same order, so each warm-up's and each capture's collectives
    meet their counterparts on the other ranks (NCCL's are captured into the graphs)."""

    max_num_seqs: int
    max_model_len: int


@dataclass(frozen=True)
class LoadLoRA:
    """Load this rank's shard of an adapter rank 0 loaded (under rank 0's lora_id), then answer in
    an all-gather: None, or what is wrong."""

    name: str
    path: str
    lora_id: int


@dataclass(frozen=True)
class Logits:
    hidden: torch.Tensor  # [S, hidden]: the rows whose logits rank 0 computes now


@dataclass(frozen=True)
class Embed:
    input_ids: torch.Tensor  # [S]: tokens rank 0 embeds outside a forward (an EAGLE head's input)


@dataclass(frozen=True)
class CopyBlocks:
    copies: list[tuple[int, int]]


@dataclass(frozen=True)
class BindKV:
    num_blocks: int
    host_blocks: int = 0  # slots of the host KV tier (--kv-offload-memory), each rank's own shard


@dataclass(frozen=True)
class HostKVCopies:
    """The host KV tier's copies rank 0 made, sent ahead of a command other than a Forward that
    touches the cache (a block copy, a disaggregation transfer): the ranks make them first."""

    copies: tuple[HostCopy, ...]


@dataclass(frozen=True)
class Profile:
    num_tokens: int
    num_seqs: int


@dataclass(frozen=True)
class Ping:
    pass


Command = (
    Forward
    | CaptureGraphs
    | Logits
    | Embed
    | CopyBlocks
    | BindKV
    | HostKVCopies
    | Profile
    | Ping
    | LoadLoRA
    | ReadKV
    | WriteKV
)


class StepDriver:
    """Rank 0's side: broadcasts each command before rank 0 runs it itself."""

    def __init__(self, timeout_s: float, ranks_watched: bool = True) -> None:
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._detached = False
        # Idle ranks are pinged often enough never to time out. Where a rank's loss has no watcher
        # here (ranks on other hosts, --nnodes > 1), every second: the ping is what notices it,
        # within about a second of idling rather than a quarter of the (minutes-long) timeout.
        self._interval = max(timeout_s / 4, 0.5)
        if not ranks_watched:
            self._interval = min(PING_INTERVAL_S, max(timeout_s / 4, 0.1))
        self._stop = threading.Event()
        self._lora_step: LoRAStep | None = None  # staged for the next forward
        self._host_kv: list[HostCopy] = []  # the host KV tier's copies not sent yet (engine thread)
        # lora_ids whose adapter rank 0 dropped (appended by finalizers, on any thread)
        self._released_loras: collections.deque[int] = collections.deque()
        self._pinger = threading.Thread(target=self._ping_loop, name="tp-ping", daemon=True)
        self._pinger.start()

    def send(self, cmd: Command) -> None:
        if self._detached:
            return
        with self._lock:
            self._send_host_kv()
            parallel.broadcast_object(cmd)
            self._last = time.monotonic()

    @contextlib.contextmanager
    def command(self, cmd: Command) -> Iterator[None]:
        """Broadcast `cmd` and keep the control group until the block ends: the command's own
        point-to-point transfers on that group (kv_reshard.py) must not meet a ping."""
        with self._lock:
            self._send_host_kv()
            parallel.broadcast_object(cmd)
            yield
            self._last = time.monotonic()

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        if self._detached:
            return
        lora, self._lora_step = self._lora_step, None
        released = self.take_released_loras()
        host_kv, self._host_kv = tuple(self._host_kv), []
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
                lora,
                released,
                host_kv,
            )
        )

    def forward_graph(
        self,
        input_ids: list[int] | torch.Tensor,
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: torch.Tensor,
        graph_size: int,
    ) -> None:
        """Rank 0 replays its decode graph of `graph_size` for this step: the other ranks replay
        theirs of the same size on these inputs (cuda_graph.CudaGraphRunner.run's arguments)."""
        if self._detached:
            return
        num_seqs = len(positions)
        ids = input_ids.cpu() if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
        lora, self._lora_step = self._lora_step, None
        host_kv, self._host_kv = tuple(self._host_kv), []
        self.send(
            Forward(
                ids,
                torch.tensor(positions),
                torch.tensor(slot_mapping),
                block_tables.cpu(),
                torch.arange(num_seqs + 1, dtype=torch.int32),
                torch.tensor(seq_lens, dtype=torch.int32),
                1,
                num_seqs,
                lora,
                self.take_released_loras(),
                host_kv,
                graph_size,
            )
        )

    def stage_lora(self, step: LoRAStep) -> None:
        """The LoRA pool's refills and mapping for the next forward (sent with it)."""
        self._lora_step = step

    def stage_host_kv(self, copy: HostCopy) -> None:
        """A copy rank 0's host KV tier just made (kv_offload.py): every rank makes it before the
        next command that touches the cache, in the order rank 0 made them."""
        self._host_kv.append(copy)

    def _send_host_kv(self) -> None:
        """(under the lock) The pending host copies as a command of their own, ahead of a command
        that does not carry them (a Forward does)."""
        if self._host_kv:
            copies, self._host_kv = tuple(self._host_kv), []
            parallel.broadcast_object(HostKVCopies(copies))

    def share_lora(self, adapter: LoRAAdapter) -> None:
        """Every other rank loads its shard of `adapter` (rank 0 loaded its own); raises
        LoRAAdapterError with the first failing rank's message (the others then drop theirs)."""
        with self._lock:
            try:
                parallel.broadcast_object(LoadLoRA(adapter.name, adapter.path, adapter.lora_id))
                answers = parallel.all_gather_object(None)
            except Exception as exc:  # a rank is gone: the group cannot serve on
                group_failed(exc)
            self._last = time.monotonic()
        for rank, error in enumerate(answers):
            if error is not None:
                raise LoRAAdapterError(f"tensor-parallel rank {rank}: {error}")
        # (the finalizer holds no reference to the adapter, only its id)
        weakref.finalize(adapter, self._released_loras.append, adapter.lora_id)

    def take_released_loras(self) -> tuple[int, ...]:
        """The lora_ids whose adapter rank 0 dropped since the last call (the next forward's)."""
        released: list[int] = []
        while self._released_loras:
            released.append(self._released_loras.popleft())
        return tuple(released)

    def compute_logits(self, hidden: torch.Tensor) -> None:
        self.send(Logits(hidden.cpu()))

    def embed(self, input_ids: torch.Tensor) -> None:
        self.send(Embed(input_ids.cpu()))

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
                    parallel.flush_commands()  # (queued commands: a lost rank shows when waited for)
                    self._last = time.monotonic()
                except Exception as exc:  # a rank is gone (on another host no watcher sees it)
                    group_failed(exc)
                    return
                finally:
                    self._lock.release()

    def close(self) -> None:
        self._stop.set()


class DrivenKVCache(KVCache):
    """Rank 0's KV cache: a copy of blocks (copy-on-fork) happens on every rank, and disaggregation
    reads and writes the group's KV in the model's layout (kv_reshard.py)."""

    driver: StepDriver | None = None

    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(cfg, num_blocks, block_size, dtype, device)
        state = parallel.current()
        self.ranks = kv_reshard.rank_kv(cfg, state.tp_size, state.pp_size)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies and self.driver is not None:
            self.driver.send(CopyBlocks(copies))
        super().copy_blocks(copies)

    def read_blocks(self, layer_start: int, layer_end: int, block_ids: tuple[int, ...]) -> torch.Tensor:
        assert self.driver is not None
        cmd = ReadKV(tuple(block_ids), layer_start, layer_end)
        try:
            with self.driver.command(cmd):
                return kv_reshard.gather(self.tensor, self.ranks, cmd, self.model_shape[4])
        except Exception as exc:  # a rank is gone mid-transfer: the group cannot go on
            group_failed(exc)
            raise

    def write_blocks(self, layer_start: int, layer_end: int, block_ids: list[int], src: torch.Tensor) -> None:
        assert self.driver is not None
        cmd = WriteKV(tuple(block_ids), layer_start, layer_end)
        try:
            with self.driver.command(cmd):
                kv_reshard.scatter(self.tensor, self.ranks, cmd, src)
        except Exception as exc:
            group_failed(exc)
            raise


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


# What rank 0 runs before a failed group's process exits (tp_launch registers the Ray ranks'
# terminate: a local Ray cluster's processes would outlive the os._exit otherwise).
_on_failure: list[Callable[[], None]] = []


def on_group_failure(cleanup: Callable[[], None]) -> None:
    _on_failure.append(cleanup)


def group_failed(exc: BaseException) -> NoReturn:
    """A step of a tensor-parallel group raised (a collective with a dead or stuck rank, or rank 0's
    ping of idle ranks): the group cannot go on, so this process exits and its ranks with it;
    `tandem up` restarts the worker."""
    log.error("tensor-parallel step failed (%s): taking the worker group down", exc)
    for cleanup in _on_failure:
        with contextlib.suppress(Exception):
            cleanup()
    logging.shutdown()
    os._exit(1)
