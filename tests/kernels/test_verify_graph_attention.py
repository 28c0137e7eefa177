"""The Triton attention of a speculative verification graph (services/worker/speculative/verify_graph.py):
a step packed into graph (bs, q) — real rows first, padding rows with slot -1, padding sequences
with seq_len 0 and an empty query range, max_seqlen_q = q whatever the step's drafts — gives its
real rows exactly what the unpadded step gives, and the padding writes no KV. The kernels' grids
then come from the graph's fixed sizes alone (batch bs, q query rows), never from the step."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import reference
from services.worker.speculative.verify_graph import PackLayout, pack_step

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(scope="module")
def triton_ops():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_padded_verification_step_attends_like_the_step(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(3)
    num_q_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    # a drafted sequence (K = 4), a shorter draft, a plain decode beside them, one crossing a block
    seqs = [(40, 5), (2 * block_size - 3, 3), (17, 1), (block_size - 2, 5)]
    batch = make_paged_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen)
    scale = 1.0 / math.sqrt(head_dim)
    num_tokens = batch.q.shape[0]
    bs, q = 8, 5  # four padding sequences, 20 padding rows
    max_blocks = batch.block_tables.shape[1] + 2
    layout = PackLayout(max_tokens=bs * q, max_seqs=bs, max_blocks=max_blocks)
    stage = torch.zeros(layout.length, dtype=torch.int32)
    pack_step(
        stage,
        layout,
        bs,
        q,
        [0] * num_tokens,
        [0] * num_tokens,
        batch.slot_mapping.tolist(),
        batch.cu_seqlens_q.tolist(),
        batch.seq_lens.tolist(),
        batch.block_tables.cpu(),
    )
    pack = stage.to(device)
    # the graph's static buffers: stale tables and garbage query rows where the step has none
    tables = torch.randint(0, batch.kv_cache.shape[1], (bs, max_blocks), generator=gen, dtype=torch.int32)
    tables[: len(seqs), : batch.block_tables.shape[1]] = batch.block_tables.cpu()
    tables = tables.to(device)
    q_pad = torch.randn(bs * q, num_q_heads, head_dim, generator=gen).to(dtype).to(device)
    q_pad[:num_tokens] = batch.q
    cu = pack[layout.cu_seqlens : layout.cu_seqlens + bs + 1]
    seq_lens = pack[layout.seq_lens : layout.seq_lens + bs]
    slots = pack[2 * layout.max_tokens : 2 * layout.max_tokens + bs * q]

    padded = triton_ops.paged_attention(
        q_pad, batch.kv_cache, tables, cu, seq_lens, scale, q, num_decode_rows=0
    )
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
    alone = triton_ops.paged_attention(*args, scale, q)  # the prefill kernel over the step as it is
    ref = reference.paged_attention(*args, scale, batch.max_seqlen_q)
    assert torch.equal(padded[:num_tokens], alone)
    assert rel_err(padded[:num_tokens], ref) < tol_for(dtype)

    # the KV write of the padded rows: the real rows' slots only
    cache = torch.zeros_like(batch.kv_cache)
    k_pad = torch.randn(bs * q, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v_pad = torch.randn(bs * q, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k_pad[:num_tokens], v_pad[:num_tokens] = batch.new_k, batch.new_v
    triton_ops.write_kv_cache(k_pad, v_pad, cache, slots)
    expected = torch.zeros_like(batch.kv_cache)
    reference.write_kv_cache(batch.new_k, batch.new_v, expected, batch.slot_mapping)
    assert torch.equal(cache, expected)
