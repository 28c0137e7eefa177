"""Random paged-attention inputs shared by the reference and kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D] new tokens of all sequences, concatenated
    kv_cache: torch.Tensor  # [2, NB, BS, Hkv, D] one layer, blocks of each sequence scattered at random
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    max_seqlen_q: int
    slot_mapping: torch.Tensor  # [T] int64 slots of the new tokens
    new_k: torch.Tensor  # [T, Hkv, D] K of the new tokens (already written to the cache)
    new_v: torch.Tensor  # [T, Hkv, D]
    dense_k: list[torch.Tensor]  # per sequence [S, Hkv, D]
    dense_v: list[torch.Tensor]


def make_paged_batch(
    seqs: list[tuple[int, int]],  # (cached prefix len, new tokens) per sequence
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
    gen: torch.Generator,
    extra_blocks: int = 3,
) -> PagedBatch:
    """A batch whose full K/V is written to randomly chosen cache blocks (so the block table matters)."""
    blocks_per_seq = [(c + n + block_size - 1) // block_size for c, n in seqs]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    dense_k, dense_v, qs, new_k, new_v, slots = [], [], [], [], [], []
    used = 0
    for b, (cached, new) in enumerate(seqs):
        ids = perm[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        tables[b, : len(ids)] = ids.to(torch.int32)
        total = cached + new
        k = kv[0, ids].flatten(0, 1)[:total]
        v = kv[1, ids].flatten(0, 1)[:total]
        dense_k.append(k)
        dense_v.append(v)
        qs.append(torch.randn(new, num_q_heads, head_dim, generator=gen).to(dtype))
        new_k.append(k[cached:])
        new_v.append(v[cached:])
        pos = torch.arange(cached, total)
        slots.append(ids[pos // block_size].long() * block_size + pos % block_size)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([n for _, n in seqs]), 0)
    return PagedBatch(
        q=torch.cat(qs).to(device),
        kv_cache=kv.to(device),
        block_tables=tables.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=device),
        max_seqlen_q=max(n for _, n in seqs),
        slot_mapping=torch.cat(slots).to(device),
        new_k=torch.cat(new_k).to(device),
        new_v=torch.cat(new_v).to(device),
        dense_k=[t.to(device) for t in dense_k],
        dense_v=[t.to(device) for t in dense_v],
    )
