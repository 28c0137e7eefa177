"""The decode kernel with rotary + KV write fused in (`rotary_write_paged_attention` on a decode
batch) against the reference's rotary_write_kv_cache then paged_attention: same output, same cache.

CPU: Triton's interpreter in fp32 / fp16; CUDA (`gpu` marker): bf16, longer contexts and more splits.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_fused_rotary_decode_attention(device: str, dtype: torch.dtype) -> None:
    skip_without(device)
    pytest.importorskip("triton")
    from kernels.triton import decode_attention as da
    from kernels.triton.paged_attention import rotary_write_paged_attention

    limit = tol_for(dtype)
    gen = torch.Generator().manual_seed(11)
    # (num_q_heads, num_kv_heads, head_dim, block_size): GQA 1, 4, 7
    shapes = [(4, 4, 64, 16), (8, 2, 128, 32), (14, 2, 64, 16)]
    lens = [1, 17, 40, 3 * 16 + 1]
    if device == "cuda":
        shapes += [(32, 8, 128, 16), (12, 2, 128, 32)]
        lens += [700, 4000, 2049]
    for num_q_heads, num_kv_heads, head_dim, block_size in shapes:
        batch = make_paged_batch(
            [(n - 1, 1) for n in lens], num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
        )
        tokens = batch.q.shape[0]
        # CUDA-graph padding: one trailing entry with no token and seq_len 0, one extra q row.
        cu = torch.cat([batch.cu_seqlens_q, batch.cu_seqlens_q[-1:]])
        seq_lens = torch.cat([batch.seq_lens, torch.zeros(1, dtype=torch.int32, device=device)])
        tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:1])])
        qkv = torch.randn(tokens + 1, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
        qkv = qkv.to(dtype).to(device)
        q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(-1, num_q_heads, head_dim)  # strided views, as the model passes them
        k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
        positions = torch.cat([(batch.seq_lens - 1).long(), torch.zeros(1, dtype=torch.long, device=device)])
        slots = torch.cat([batch.slot_mapping, torch.full((1,), -1, dtype=torch.long, device=device)])
        cos_sin = reference.build_rope_cache(head_dim, 8192, 10000.0, None, dtype, device)
        scale = 1.0 / math.sqrt(head_dim)

        rows = tokens  # the padding row is left unwritten
        # The raw residual stream q/k/v were projected from (folded norms): its 1/rms scales them.
        hidden = torch.randn(tokens + 1, 3 * head_dim, generator=gen).mul(4.0).to(dtype).to(device)
        inv_rms = torch.rsqrt(hidden.float().pow(2).mean(-1) + 1e-5)[:, None, None]
        for rms_input in (None, hidden):
            qs, ks, vs = (q, k, v) if rms_input is None else ((t * inv_rms).to(dtype) for t in (q, k, v))
            expected_cache = batch.kv_cache.clone()
            q_rot = reference.rotary_write_kv_cache(qs, ks, vs, expected_cache, slots, positions, cos_sin)
            ref = reference.paged_attention(q_rot, expected_cache, tables, cu, seq_lens, scale, 1)
            for max_splits in (None, 3):
                cache = batch.kv_cache.clone()
                if max_splits is None:
                    out = rotary_write_paged_attention(
                        q,
                        k,
                        v,
                        cache,
                        slots,
                        positions,
                        cos_sin,
                        tables,
                        cu,
                        seq_lens,
                        scale,
                        1,
                        rms_input,
                        1e-5,
                    )
                else:  # the new token in a later split than the first
                    rotary = da.RotaryKV(k, v, slots, positions, cos_sin, rms_input, 1e-5)
                    out = da.decode_attention(
                        q, cache, tables, cu, seq_lens, scale, max_splits=3, rotary=rotary
                    )
                err = rel_err(out[:rows], ref[:rows])
                assert err < limit, (num_q_heads, num_kv_heads, head_dim, max_splits, rms_input is None, err)
                torch.testing.assert_close(cache, expected_cache, atol=limit * 4, rtol=limit * 2)
