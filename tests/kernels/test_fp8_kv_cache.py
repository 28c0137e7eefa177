"""The fp8 (e4m3) KV cache (`--kv-cache-dtype fp8`): the Triton kernels read and write it exactly as
the reference twins do (both widen the same fp8 values), and the attention stays close to the
full-precision cache's (only the K/V rounding differs).

CPU: Triton's interpreter with fp32 / fp16 activations; CUDA (`gpu` marker): bf16, long contexts.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits (relative rounding <= 1/16): attention over such K/V stays within a
# few percent of the exact one for unit-scale inputs.
FP8_VS_EXACT = 0.08


def assert_same_fp8(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal fp8 caches. On the CPU, Triton 3.6's interpreter converts to fp8 inexactly: values off
    by one fp8 step, and a value just below a power of two that should round up to it (1.986 ->
    2.0) rounded down a binade (-> 1.0), a few % of random values; the GPU's conversion is exact.
    Those, and only those, may differ there (slots, rotary and the cast are still checked)."""
    if ours.device.type == "cuda":
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
        return
    differ = ours.view(torch.uint8) != ref.view(torch.uint8)
    a, b = ours[differ].float(), ref[differ].float()
    binade_bug = (a * 2 == b) & (torch.log2(b.abs()).frac() == 0)  # b a power of two
    step = torch.where(b.abs() >= 2**-6, torch.exp2(torch.floor(torch.log2(b.abs())) - 3), 2**-9)
    ok = binade_bug | ((a - b).abs() <= step)
    assert torch.all(ok), (a[~ok][:8], b[~ok][:8])
    assert differ.float().mean() < 0.1


@pytest.fixture(scope="module")
def triton_ops():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_attention_over_an_fp8_cache(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """Decode steps, prompt chunks with a cached prefix and mixed steps over an fp8 cache."""
    skip_without(device)
    gen = torch.Generator().manual_seed(21)
    shapes = [(4, 4, 64, 16), (8, 2, 128, 32), (14, 2, 64, 16)]
    decodes = [(40, 1), (17, 1), (0, 1)]
    prompts = [(0, 37), (20, 9)]
    if device == "cuda":
        shapes += [(32, 8, 128, 16)]
        decodes += [(3000, 1), (700, 1)]
        prompts += [(1000, 300)]
    for num_q_heads, num_kv_heads, head_dim, block_size in shapes:
        for seqs, num_decode_rows in ((decodes, 0), (prompts, 0), (decodes + prompts, len(decodes))):
            batch = make_paged_batch(
                seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
            )
            cache = batch.kv_cache.to(FP8)
            scale = 1.0 / math.sqrt(head_dim)
            meta = (batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, batch.max_seqlen_q)
            out = triton_ops.paged_attention(batch.q, cache, *meta, num_decode_rows=num_decode_rows)
            ref = reference.paged_attention(batch.q, cache, *meta)
            exact = reference.paged_attention(batch.q, batch.kv_cache, *meta)
            case = (num_q_heads, num_kv_heads, head_dim, block_size, len(seqs), num_decode_rows)
            assert rel_err(out, ref) < tol_for(dtype), (case, rel_err(out, ref))
            assert rel_err(ref, exact) < FP8_VS_EXACT, (case, rel_err(ref, exact))


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_kv_writes_into_an_fp8_cache(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """The KV write, rotary + KV write, and the decode kernel's fused rotary + write store the same
    fp8 bytes as the reference's composition (rounded to the activations' dtype, then to fp8)."""
    skip_without(device)
    gen = torch.Generator().manual_seed(22)
    num_q_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    lens = [1, 17, 40] + ([900, 2100] if device == "cuda" else [])
    batch = make_paged_batch(
        [(n - 1, 1) for n in lens], num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
    )
    tokens = batch.q.shape[0]
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    positions = (batch.seq_lens - 1).long()
    cos_sin = reference.build_rope_cache(head_dim, 4096, 10000.0, None, dtype, device)
    scale = 1.0 / math.sqrt(head_dim)

    ours, ref = batch.kv_cache.to(FP8), batch.kv_cache.to(FP8)
    triton_ops.write_kv_cache(k, v, ours, batch.slot_mapping)
    reference.write_kv_cache(k, v, ref, batch.slot_mapping)
    assert_same_fp8(ours, ref)

    ours, ref = batch.kv_cache.to(FP8), batch.kv_cache.to(FP8)
    q_ours = triton_ops.rotary_write_kv_cache(batch.q, k, v, ours, batch.slot_mapping, positions, cos_sin)
    q_ref, k_ref = reference.rotary(batch.q, k, positions, cos_sin)
    reference.write_kv_cache(k_ref, v, ref, batch.slot_mapping)
    torch.testing.assert_close(q_ours, q_ref)
    assert_same_fp8(ours, ref)

    # A decode step: rotary, the fp8 write and attention in the one decode kernel.
    ours = batch.kv_cache.to(FP8)
    out = triton_ops.rotary_write_attention(
        batch.q, k, v, ours, batch.slot_mapping, positions, cos_sin,
        batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 1,
    )  # fmt: skip
    assert_same_fp8(ours, ref)
    # The kernel attends the new token with the fp8 value it stored: the reference over that cache.
    expected = reference.paged_attention(
        q_ref, ours, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 1
    )
    assert rel_err(out, expected) < tol_for(dtype), rel_err(out, expected)
