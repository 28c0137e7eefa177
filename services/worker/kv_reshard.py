"""A parallel group's KV cache in the model's layout: what disaggregation moves between workers
of different tensor / pipeline layouts.

Each rank's cache holds its pipeline stage's layers and its KV heads (parallel.py):

    rank r = stage * T + t     layers [stage's start, end)   KV heads [t * H/T, (t+1) * H/T)
                                                             (T > H: head t * H // T, replicated
                                                             on T / H ranks)

FetchKV chunks carry the model's layout: layer indices of the whole model, all H KV heads
(kv_transfer.py). Rank 0 is the group's only network endpoint, so it translates:

    prefill group, read:  rank 0 broadcasts ReadKV(blocks, layers); every rank that holds some
                          of those layers sends rank 0 its heads of them, over the gloo control
                          group; a replicated head comes from its first replica only. Rank 0
                          assembles the chunk [layers, 2, blocks, block_size, H, head_dim].
    decode group, write:  rank 0 broadcasts WriteKV(blocks, layers) and sends each rank exactly
                          its heads of its layers (every replica gets its copy), writing its own.

So the bytes that cross the network are the model's KV once, whatever either side's layout, and
within a group each rank sends or receives only the heads it holds. Every transfer runs on rank 0's
engine thread with the driver's lock held (tp_group.py), between steps, as the group's other
commands do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker import parallel
from services.worker.model_config import ModelConfig


@dataclass(frozen=True)
class ReadKV:
    """Rank 0 -> the group: send rank 0 your part of layers [layer_start, layer_end) x blocks."""

    block_ids: tuple[int, ...]
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class WriteKV:
    """Rank 0 -> the group: receive your part of layers [layer_start, layer_end) x blocks."""

    block_ids: tuple[int, ...]
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class RankKV:
    """What one rank's KV cache holds, in the model's numbering."""

    rank: int
    layer_start: int  # [layer_start, layer_end): its pipeline stage's layers
    layer_end: int
    head_start: int  # [head_start, head_start + num_heads): its KV heads
    num_heads: int
    first_replica: bool  # the copy of its heads that is read (a replicated head is sent once)

    def layers_in(self, start: int, end: int) -> tuple[int, int]:
        """Its share of model layers [start, end) (empty: lo >= hi)."""
        return max(start, self.layer_start), min(end, self.layer_end)


def rank_kv(cfg: ModelConfig, tp_size: int, pp_size: int) -> list[RankKV]:
    """Every rank's part of the KV cache, in rank order."""
    replicas = tp_size // cfg.num_kv_heads if tp_size > cfg.num_kv_heads else 1
    ranks = []
    for stage in range(pp_size):
        for t in range(tp_size):
            layout = parallel.shard_layout(cfg, parallel.ParallelState(tp_size, t, pp_size, stage))
            ranks.append(
                RankKV(
                    rank=stage * tp_size + t,
                    layer_start=layout.layer_start,
                    layer_end=layout.layer_end,
                    head_start=layout.kv_head_start,
                    num_heads=layout.num_kv_heads,
                    first_replica=t % replicas == 0,
                )
            )
    return ranks


def _local(kv: torch.Tensor, me: RankKV, block_ids: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """This rank's kv[layers lo..hi (model numbering), :, block_ids] on the host."""
    part = kv[lo - me.layer_start : hi - me.layer_start].index_select(
        2, torch.tensor(block_ids, device=kv.device)
    )
    return part.cpu()


def gather(kv: torch.Tensor, ranks: list[RankKV], cmd: ReadKV, num_kv_heads: int) -> torch.Tensor:
    """Rank 0, after broadcasting `cmd`: the chunk in the model's layout, on the host
    [layers, 2, blocks, block_size, num_kv_heads, head_dim], each part received from the first
    replica of its heads."""
    _, _, _, block_size, _, head_dim = kv.shape
    l0, l1 = cmd.layer_start, cmd.layer_end
    out = torch.empty((l1 - l0, 2, len(cmd.block_ids), block_size, num_kv_heads, head_dim), dtype=kv.dtype)
    for r in ranks:
        lo, hi = r.layers_in(l0, l1)
        if lo >= hi or not r.first_replica:
            continue
        if r.rank == 0:
            part = _local(kv, r, cmd.block_ids, lo, hi)
        else:
            shape = (hi - lo, 2, len(cmd.block_ids), block_size, r.num_heads, head_dim)
            part = parallel.recv_ctrl(torch.empty(shape, dtype=kv.dtype), r.rank)
        out[lo - l0 : hi - l0, ..., r.head_start : r.head_start + r.num_heads, :] = part
    return out


def scatter(kv: torch.Tensor, ranks: list[RankKV], cmd: WriteKV, src: torch.Tensor) -> None:
    """Rank 0, after broadcasting `cmd`: send each rank its heads of its layers of `src` (the
    chunk in the model's layout, [layers, 2, blocks, block_size, num_kv_heads, head_dim]) and
    write its own."""
    l0, l1 = cmd.layer_start, cmd.layer_end
    for r in ranks:
        lo, hi = r.layers_in(l0, l1)
        if lo >= hi:
            continue
        part = src[lo - l0 : hi - l0, ..., r.head_start : r.head_start + r.num_heads, :]
        if r.rank == 0:
            _write(kv, r, cmd.block_ids, lo, hi, part)
        else:
            parallel.send_ctrl(part.cpu(), r.rank)


def serve(kv: torch.Tensor, ranks: list[RankKV], cmd: ReadKV | WriteKV) -> None:
    """Ranks 1..: this rank's side of a ReadKV (send its part) or WriteKV (receive and write it)."""
    me = ranks[parallel.current().rank]
    lo, hi = me.layers_in(cmd.layer_start, cmd.layer_end)
    if lo >= hi:
        return
    if isinstance(cmd, ReadKV):
        if me.first_replica:
            parallel.send_ctrl(_local(kv, me, cmd.block_ids, lo, hi), 0)
        return
    _, _, _, block_size, num_heads, head_dim = kv.shape
    shape = (hi - lo, 2, len(cmd.block_ids), block_size, num_heads, head_dim)
    part = parallel.recv_ctrl(torch.empty(shape, dtype=kv.dtype), 0)
    _write(kv, me, cmd.block_ids, lo, hi, part)


def _write(
    kv: torch.Tensor, me: RankKV, block_ids: tuple[int, ...], lo: int, hi: int, part: torch.Tensor
) -> None:
    index = torch.tensor(block_ids, device=kv.device)
    kv[lo - me.layer_start : hi - me.layer_start, :, index] = part.to(kv.device)
