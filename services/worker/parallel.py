"""Tensor parallelism: the process group, the shard layout of a model, and the collectives.

One worker process group is one gRPC worker: rank 0 serves, schedules and samples; ranks 1..T-1
run the model only (services/worker/tp_group.py). Every rank holds a 1/T slice of each layer:

    qkv_proj, gate_up_proj, experts' w13   column-parallel (a slice of the output rows)
    o_proj, down_proj, experts' w2         row-parallel (a slice of the input columns), then ONE
                                           all-reduce of the [tokens, hidden] output
    embed_tokens, lm_head                  vocabulary-parallel (a slice of the vocabulary rows):
                                           the embedding all-reduces, the LM head all-gathers

KV heads are split like the attention heads; with T > num_kv_heads each KV head is replicated on
T / num_kv_heads ranks (rank r holds KV head r * num_kv_heads // T). Norms, the MoE router and
the rotary cache are replicated.

Pipeline parallelism (P stages) splits the layers: stage s holds layers [s*L/P, (s+1)*L/P) (the
first stages take one more when P does not divide L) and its slice of the KV cache; the hidden
states (and the residual stream) go from stage to stage by point-to-point sends, and the last
stage sends its output back to stage 0, which holds the embedding, the final norm and the LM head
(the other stages neither build nor read them: `ShardLayout.first_stage`). Rank = stage * T +
tensor-parallel rank.

With T = P = 1 the layout is the whole model and no collective runs: `current()` is the trivial
state unless `init_process_group` was called. `single_rank()` makes it the trivial state for one
thread's block: a speculative draft on rank 0 of a group is built unsharded (whole weights, its own
whole KV cache) and runs no collective, whatever the target's layout.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import pickle
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from services.worker.model_config import ModelConfig, ModelConfigError


@dataclass(frozen=True)
class ParallelState:
    """This process's place in its worker group."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0  # the stage
    # The group the model's collectives run on (NCCL on CUDA, gloo on CPU) and a gloo group for the
    # control plane (rank 0 -> others: the step inputs, pickled host objects).
    group: dist.ProcessGroup | None = None
    ctrl_group: dist.ProcessGroup | None = None
    # P > 1: the last stage's sends back to stage 0 go over a group of their own. On NCCL the
    # sends and receives of one pair of ranks run in order on one stream; with P = 2 and
    # micro-batches, stage 0's send of micro-batch 1 and stage 1's return of micro-batch 0 would
    # each wait behind the other's receive there (pipeline.py).
    return_group: dist.ProcessGroup | None = None
    # The model group's backend ("nccl" | "gloo"; "" for the trivial state) and this rank's device
    # type: gloo on CUDA (`--distributed-backend gloo`, e.g. T ranks sharing one GPU) stages the
    # collectives gloo has no CUDA path for through host memory (`_host_staged`).
    backend: str = ""
    device_type: str = "cpu"

    @property
    def gloo_on_cuda(self) -> bool:
        return self.backend == "gloo" and self.device_type == "cuda"

    @property
    def graphs_capturable(self) -> bool:
        """Whether the model's collectives can be captured in a CUDA graph: NCCL's are (they are
        kernels on the capturing stream); gloo's run on the host (its CUDA all-reduce copies to
        host memory and back, with host synchronisation), which a graph cannot record."""
        return self.world_size == 1 or self.backend == "nccl"

    @property
    def is_driver(self) -> bool:
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size


_STATE = ParallelState()
# `single_rank()`'s override, per thread: rank 0's ping thread keeps using the group meanwhile
_LOCAL = threading.local()


def current() -> ParallelState:
    """This thread's view of its place in the group (the trivial state inside `single_rank()`)."""
    override: ParallelState | None = getattr(_LOCAL, "state", None)
    return override if override is not None else _STATE


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """Within the block, on this thread, the process is a group of one: `shard_layout` gives whole
    tensors and the model collectives are no-ops. For what rank 0 of a group keeps to itself (a
    speculative draft model or EAGLE head with its KV cache); the control plane
    (`broadcast_object`, the KV moves) still talks to the group."""
    saved = getattr(_LOCAL, "state", None)
    _LOCAL.state = ParallelState()
    try:
        yield
    finally:
        _LOCAL.state = saved


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the group's rendezvous port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_process_group(
    rank: int,
    tp_size: int,
    pp_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    timeout_s: float,
    backend: str = "auto",
) -> ParallelState:
    """Join the worker group (blocks until every rank joined). `timeout_s` bounds every collective:
    a rank that stops answering turns into an error on the others, never a hang. `backend` of the
    model's collectives: "auto" = NCCL on CUDA, gloo on the CPU (`resolve_backend`)."""
    global _STATE
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = resolve_backend(backend, device)
    if backend == "nccl":
        # The decode CUDA graphs capture NCCL collectives (engine.py): with record_stream on the
        # caching allocator's bookkeeping of the captured collectives' tensors breaks the capture
        # (vLLM's finding, vllm-project/vllm#2152); the process group then holds the tensors until
        # each collective is waited on instead. Read when the NCCL group is created.
        os.environ.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=tp_size * pp_size,
        timeout=timeout,
    )
    group = dist.group.WORLD
    if pp_size > 1:  # one tensor-parallel group per stage (every rank creates every group)
        for stage in range(pp_size):
            stage_group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)), timeout=timeout)
            if stage == rank // tp_size:
                group = stage_group
    # Its own group even on gloo: rank 0's idle pings (tp_group.py) must never interleave with a
    # model collective of the engine thread on the same group.
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    back = dist.new_group(timeout=timeout) if pp_size > 1 else None
    _STATE = ParallelState(
        tp_size, rank % tp_size, pp_size, rank // tp_size, group, ctrl, back, backend, device.type
    )
    return _STATE


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """--distributed-backend: "auto" = NCCL on CUDA, gloo on the CPU; "gloo" on CUDA runs the
    collectives on the host (slow, but any number of ranks may share a GPU, which NCCL refuses)."""
    device_type = torch.device(device).type
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ModelConfigError("--distributed-backend nccl needs CUDA devices (the CPU runs gloo)")
    return backend


def destroy_process_group() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


# ---- collectives (no-ops with T = 1) ------------------------------------------------------------
# gloo with CUDA tensors (`--distributed-backend gloo` on GPUs): torch documents gloo's all_reduce
# and broadcast for CUDA tensors (it copies them to host memory itself), but not all_gather,
# send or recv. Those stage through host memory here, in that backend + device combination only;
# NCCL and gloo on the CPU take the tensors as they are.
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the tensor-parallel ranks (in place; returns x)."""
    state = current()
    if state.tp_size > 1:
        dist.all_reduce(x, group=state.group)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of x over the tensor-parallel ranks (in place; returns x)."""
    state = current()
    if state.tp_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=state.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., T * n], rank order."""
    state = current()
    if state.tp_size == 1:
        return x
    src = x.contiguous()
    if state.backend == "nccl":
        # One output tensor [T, ...] (no list of parts): the form a CUDA graph captures cleanly
        # (a group's decode graphs gather the LM head's logits, model_runner.py).
        out = torch.empty((state.tp_size, *src.shape), dtype=src.dtype, device=src.device)
        dist.all_gather_into_tensor(out, src, group=state.group)
        return out.movedim(0, -2).reshape(*src.shape[:-1], state.tp_size * src.shape[-1])
    staged = _host_staged(state, src)
    parts = [torch.empty_like(staged) for _ in range(state.tp_size)]
    dist.all_gather(parts, staged, group=state.group)
    return torch.cat(parts, dim=-1).to(x.device)


def _host_staged(state: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """x itself, or with gloo on CUDA a host copy of it (see above)."""
    return x.cpu() if state.gloo_on_cuda and x.is_cuda else x


@dataclass(frozen=True)
class PendingSend:
    """A send in flight and the buffer it reads (alive until `wait` returns)."""

    work: dist.Work | None
    buffer: torch.Tensor

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()


def isend_to_stage(stage: int, *tensors: torch.Tensor, tag: int = 0) -> list[PendingSend]:
    """Start sending tensors to this tensor-parallel rank's counterpart in `stage` (pipeline
    parallelism); wait on the returned sends before the tensors change. `tag` tells apart the
    micro-batches of a step (gloo matches a receive by it; NCCL keeps the order)."""
    state = current()
    dst = stage * state.tp_size + state.tp_rank
    group = state.return_group if stage == 0 else None  # (the last stage returning to stage 0)
    sends = []
    for t in tensors:
        buffer = _host_staged(state, t.contiguous())
        sends.append(PendingSend(dist.isend(buffer, dst=dst, group=group, tag=tag), buffer))
    return sends


def recv_from_stage(stage: int, *like: torch.Tensor, tag: int = 0) -> list[torch.Tensor]:
    """Receive tensors shaped like `like` from this rank's counterpart in `stage`."""
    state = current()
    group = state.return_group if state.pp_rank == 0 else None  # stage 0 hears only the last stage
    out = []
    for t in like:
        buf = torch.empty_like(t)
        staged = _host_staged(state, buf)
        dist.recv(staged, src=stage * state.tp_size + state.tp_rank, group=group, tag=tag)
        out.append(buf.copy_(staged) if staged is not buf else buf)
    return out


def send_ctrl(x: torch.Tensor, dst: int) -> None:
    """Send a host tensor to rank `dst` over the gloo control group (KV moved within the group,
    services/worker/kv_reshard.py; rank 0 holds the driver's lock meanwhile). As raw bytes: any
    dtype (fp8 too) travels."""
    dist.send(x.contiguous().reshape(-1).view(torch.uint8), dst=dst, group=_STATE.ctrl_group)


def recv_ctrl(buf: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into the contiguous host tensor `buf` from rank `src` over the control group."""
    dist.recv(buf.reshape(-1).view(torch.uint8), src=src, group=_STATE.ctrl_group)
    return buf


def broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (pickled over the gloo control group), in the order rank 0
    sent them. With `queue_commands` on, rank 0 does not wait for the others to take it."""
    state = _STATE
    if _COMMANDS.queued:
        if state.rank == 0:
            _COMMANDS.post(obj, state)
            return obj
        return _COMMANDS.take(state)
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.ctrl_group)
    return box[0]


class _CommandQueue:
    """Rank 0's commands as point-to-point sends to each other rank over the control group, rank 0
    waiting for none of them (at most `MAX_UNTAKEN` commands behind), where a broadcast returns on
    rank 0 only once every rank took it. A pipeline-parallel group with batches in flight needs
    it: the later stages take rank 0's next Forward only when done with the batch before, while
    stage 0 is to compute the next batch meanwhile (pipeline.py). Each command's two messages
    (its size, its bytes) carry tags from a count every rank keeps alike, so a rank takes them in
    rank 0's order; tag 0 stays for the KV moves on this group (kv_reshard.py)."""

    MAX_UNTAKEN = 64

    def __init__(self) -> None:
        self.queued = False
        self._count = 0
        self._pending: collections.deque[tuple[list[dist.Work], list[torch.Tensor]]] = collections.deque()

    def _next_tag(self) -> int:
        self._count += 1
        return 2 * (self._count % 2**29) + 1  # (a C int: below 2**31)

    def post(self, obj: object, state: ParallelState) -> None:
        data = pickle.dumps(obj)
        size = torch.tensor([len(data)], dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tag = self._next_tag()
        works: list[dist.Work] = []
        for dst in range(1, state.world_size):
            for t in (size, payload):
                work = dist.isend(t, dst=dst, group=state.ctrl_group, tag=tag + (t is payload))
                assert work is not None  # (None only for a rank outside the group)
                works.append(work)
        self._pending.append((works, [size, payload]))
        while self._pending and (
            len(self._pending) > self.MAX_UNTAKEN or all(w.is_completed() for w in self._pending[0][0])
        ):
            for work in self._pending.popleft()[0]:
                work.wait()

    def take(self, state: ParallelState) -> object:
        tag = self._next_tag()
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=0, group=state.ctrl_group, tag=tag)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, src=0, group=state.ctrl_group, tag=tag + 1)
        return pickle.loads(payload.numpy().tobytes())

    def flush(self) -> None:
        """(rank 0) Wait until every rank took every command: a lost rank shows as an error here."""
        while self._pending:
            for work in self._pending.popleft()[0]:
                work.wait()


_COMMANDS = _CommandQueue()


def queue_commands(on: bool) -> None:
    """Every rank of the group alike (a pipeline-parallel group with batches in flight): rank 0's
    commands are queued point-to-point sends instead of broadcasts (`_CommandQueue`)."""
    _COMMANDS.queued = on


def flush_commands() -> None:
    """(rank 0) Wait until every rank took rank 0's commands (no-op unless they are queued)."""
    _COMMANDS.flush()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (pickled over the gloo control group)."""
    state = _STATE
    out: list[object] = [None] * state.world_size
    dist.all_gather_object(out, obj, group=state.ctrl_group)
    return out


# ---- the shard layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """Which slice of each sharded dimension this rank holds (sizes local to the rank)."""

    tp_size: int
    tp_rank: int
    num_heads: int  # attention (query) heads of this rank
    num_kv_heads: int  # KV heads of this rank
    kv_head_start: int  # first KV head of this rank in the checkpoint
    intermediate_size: int  # dense MLP
    moe_intermediate_size: int  # each expert
    vocab_size: int  # vocabulary rows of this rank (the last rank's may be padding)
    vocab_start: int
    pp_size: int = 1
    pp_rank: int = 0
    layer_start: int = 0  # this stage's layers: [layer_start, layer_end)
    layer_end: int = 0

    def holds_layer(self, layer: int) -> bool:
        return self.layer_start <= layer < self.layer_end

    @property
    def first_stage(self) -> bool:
        """Whether this rank's stage is stage 0, the one that embeds the tokens and applies the
        final norm and the LM head (pipeline.py); a later stage holds only its layers."""
        return self.pp_rank == 0

    @property
    def q_head_start(self) -> int:
        return self.tp_rank * self.num_heads


# The families whose modules and loading know the shard layout (models/llama.py and its subclasses
# that keep its modules); the others (Gemma's own modules, Phi-3's pre-fused checkpoint tensors)
# run on one rank for now.
PARALLEL_ARCHITECTURES = frozenset(
    {
        "GptOssForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)


def check_architecture(cfg: ModelConfig, world_size: int) -> None:
    if world_size > 1 and cfg.architecture not in PARALLEL_ARCHITECTURES:
        raise ModelConfigError(
            f"{cfg.architecture} cannot be split over several ranks yet (tensor/pipeline parallelism "
            f"supports {', '.join(sorted(PARALLEL_ARCHITECTURES))})"
        )


def check_tp_size(cfg: ModelConfig, tp_size: int) -> None:
    """One-line errors for a model that cannot be split over `tp_size` ranks."""
    if tp_size < 1:
        raise ModelConfigError(f"--tensor-parallel-size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    problems = []
    if cfg.num_heads % tp_size:
        problems.append(f"the {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if (kv % tp_size) if kv >= tp_size else (tp_size % kv):
        problems.append(f"the {kv} KV heads (T must divide them, or be a multiple of them)")
    if cfg.intermediate_size % tp_size:
        problems.append(f"the MLP's intermediate size {cfg.intermediate_size}")
    if cfg.num_experts and cfg.moe_intermediate_size % tp_size:
        problems.append(f"the experts' intermediate size {cfg.moe_intermediate_size}")
    if problems:
        raise ModelConfigError(
            f"--tensor-parallel-size {tp_size} does not divide {', '.join(problems)} of {cfg.path}"
        )


def check_pp_size(cfg: ModelConfig, pp_size: int) -> None:
    if pp_size < 1:
        raise ModelConfigError(f"--pipeline-parallel-size must be >= 1, got {pp_size}")
    if pp_size > cfg.num_layers:
        raise ModelConfigError(
            f"--pipeline-parallel-size {pp_size} is larger than the {cfg.num_layers} layers of {cfg.path}"
        )


def stage_layers(num_layers: int, pp_size: int, stage: int) -> tuple[int, int]:
    """[start, end) of a stage's layers: even shares, the first stages one more for a remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def shard_layout(cfg: ModelConfig, state: ParallelState | None = None) -> ShardLayout:
    state = state or current()
    t, r = state.tp_size, state.tp_rank
    check_tp_size(cfg, t)
    check_pp_size(cfg, state.pp_size)
    layer_start, layer_end = stage_layers(cfg.num_layers, state.pp_size, state.pp_rank)
    kv = cfg.num_kv_heads
    kv_local = kv // t if kv >= t else 1
    kv_start = r * kv_local if kv >= t else r * kv // t
    vocab_local = -(-cfg.vocab_size // t)
    return ShardLayout(
        tp_size=t,
        tp_rank=r,
        num_heads=cfg.num_heads // t,
        num_kv_heads=kv_local,
        kv_head_start=kv_start,
        intermediate_size=cfg.intermediate_size // t,
        moe_intermediate_size=cfg.moe_intermediate_size // t if cfg.num_experts else 0,
        vocab_size=vocab_local,
        vocab_start=r * vocab_local,
        pp_size=state.pp_size,
        pp_rank=state.pp_rank,
        layer_start=layer_start,
        layer_end=layer_end,
    )
