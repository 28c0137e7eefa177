"""The reference twins against plain dense PyTorch and transformers, on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from paged_inputs import make_paged_batch

from kernels import get_ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_get_ops_reference_on_cpu() -> None:
    ops = get_ops("reference", torch.device("cpu"))
    assert ops.name == "reference"
    assert get_ops("auto", "cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown"):
        get_ops("cudnn", "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "block_size"),
    [(4, 4, 16, 16), (8, 2, 32, 32), (7, 1, 8, 5)],
)
def test_paged_attention_matches_dense_sdpa(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    # (cached prefix, new tokens): a fresh prompt, a prompt crossing blocks with a cached prefix, decodes.
    seqs = [(0, 37), (21, 14), (40, 1), (0, 1), (block_size, block_size + 3)]
    batch = make_paged_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, "cpu", gen)
    scale = 1.0 / math.sqrt(head_dim)
    out = reference.paged_attention(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.cu_seqlens_q,
        batch.seq_lens,
        scale,
        batch.max_seqlen_q,
    )
    for b, (cached, new) in enumerate(seqs):
        s, e = int(batch.cu_seqlens_q[b]), int(batch.cu_seqlens_q[b + 1])
        q = batch.q[s:e].float().transpose(0, 1)[None]  # [1, Hq, new, D]
        k = batch.dense_k[b].float().transpose(0, 1)[None]  # [1, Hkv, S, D]
        v = batch.dense_v[b].float().transpose(0, 1)[None]
        # Dense causal mask with the query block sitting at the end of the context.
        mask = torch.ones(new, cached + new, dtype=torch.bool).tril(diagonal=cached)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        torch.testing.assert_close(
            out[s:e].float(), expected[0].transpose(0, 1), atol=TOL[dtype], rtol=TOL[dtype]
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_scatters_and_skips_padding(dtype: torch.dtype) -> None:
    num_blocks, block_size, heads, dim = 6, 4, 2, 8
    cache = torch.zeros(2, num_blocks, block_size, heads, dim, dtype=dtype)
    key = torch.randn(5, heads, dim).to(dtype)
    value = torch.randn(5, heads, dim).to(dtype)
    slots = torch.tensor([0, 7, -1, 13, 23], dtype=torch.int64)
    reference.write_kv_cache(key, value, cache, slots)
    flat = cache.view(2, -1, heads, dim)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat[0, slot], key[i]) and torch.equal(flat[1, slot], value[i])
    assert int((flat[0].abs().sum(dim=(1, 2)) > 0).sum()) == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_transformers(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hidden = 48
    norm = LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x = torch.randn(9, hidden).to(dtype)
    res = torch.randn(9, hidden).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(reference.rms_norm(x, norm.weight, 1e-6), norm(x), atol=0, rtol=0)
        normed, new_res = reference.fused_add_rms_norm(x, res, norm.weight, 1e-6)
        torch.testing.assert_close(new_res, x + res, atol=0, rtol=0)
        torch.testing.assert_close(normed, norm(x + res), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(5, 2 * 24).to(dtype)
    torch.testing.assert_close(reference.silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])


ROPE_CONFIGS = [
    {"rope_theta": 10000.0, "rope_type": "default"},
    {
        "rope_theta": 500000.0,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    {"rope_theta": 1000000.0, "rope_type": "default"},
]


@pytest.mark.parametrize("rope_parameters", ROPE_CONFIGS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_transformers(rope_parameters: dict, head_dim: int) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_parameters),
    )
    rope = LlamaRotaryEmbedding(config)
    scaling = None if rope_parameters["rope_type"] == "default" else rope_parameters
    inv_freq = reference.rope_inv_freq(head_dim, rope_parameters["rope_theta"], scaling)
    torch.testing.assert_close(inv_freq, rope.inv_freq, atol=0, rtol=0)

    cache = reference.build_rope_cache(
        head_dim, 20000, rope_parameters["rope_theta"], scaling, torch.float32, "cpu"
    )
    positions = torch.tensor([0, 1, 5, 127, 4097, 8191, 8192, 19999])
    q = torch.randn(len(positions), 4, head_dim)
    k = torch.randn(len(positions), 2, head_dim)
    cos, sin = rope(q, positions[None])  # [1, T, D]
    # HF wants [B, H, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ref, k_ref = reference.rotary(q, k, positions, cache)
    torch.testing.assert_close(q_ref, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ref, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_low_precision_close_to_fp32(dtype: torch.dtype) -> None:
    cache = reference.build_rope_cache(64, 512, 10000.0, None, torch.float32, "cpu")
    positions = torch.randint(0, 512, (11,))
    q = torch.randn(11, 4, 64)
    k = torch.randn(11, 1, 64)
    q32, k32 = reference.rotary(q, k, positions, cache)
    qlo, klo = reference.rotary(q.to(dtype), k.to(dtype), positions, cache.to(dtype))
    assert qlo.dtype == dtype
    torch.testing.assert_close(qlo.float(), q32, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)
    torch.testing.assert_close(klo.float(), k32, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


SCALED_ROPES = [
    {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0},
    {
        "rope_theta": 1000000.0,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    },
    {
        "rope_theta": 10000.0,
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 2048,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
    {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16384},
]


@pytest.mark.parametrize("rope_parameters", SCALED_ROPES)
def test_scaled_ropes_match_transformers(rope_parameters: dict) -> None:
    """Linear, YaRN (cos/sin scaled by its attention factor) and dynamic NTK (within the original
    context: the plain rope, as transformers for sequences that short) against LlamaRotaryEmbedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim = 64
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=16384,
        rope_parameters=dict(rope_parameters),
    )
    rope = LlamaRotaryEmbedding(config)
    cache = reference.build_rope_cache(
        head_dim, 8192, rope_parameters["rope_theta"], dict(rope_parameters), torch.float32, "cpu"
    )
    positions = torch.tensor([0, 1, 5, 127, 4097, 8191])
    cos, sin = rope(torch.zeros(1, 1, head_dim), positions[None])
    torch.testing.assert_close(
        cache[positions, : head_dim // 2], cos[0, :, : head_dim // 2], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        cache[positions, head_dim // 2 :], sin[0, :, : head_dim // 2], atol=1e-5, rtol=0
    )


def test_longrope_picks_its_factors_by_the_served_context() -> None:
    """LongRoPE: the short factors for a table within original_max_position_embeddings, the long
    ones for a longer table (transformers' rotation of a sequence longer than that), both scaled
    by sqrt(1 + ln(factor) / ln(original))."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    head_dim = 32
    short = [1.0 + 0.05 * i for i in range(head_dim // 2)]
    long = [1.5 + 0.3 * i for i in range(head_dim // 2)]
    scaling = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": 256,
        "factor": 4.0,
    }
    config = Phi3Config(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_parameters={k: v for k, v in scaling.items() if k != "factor"},
    )
    rope = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, 1, head_dim)
    for table_len, positions in ((256, torch.arange(0, 256, 17)), (1024, torch.arange(0, 1024, 61))):
        cache = reference.build_rope_cache(head_dim, table_len, 10000.0, scaling, torch.float32, "cpu")
        # transformers picks the factors by the longest position it is given
        cos, sin = rope(x, positions[None])
        half = head_dim // 2
        torch.testing.assert_close(cache[positions, :half], cos[0, :, :half], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[positions, half:], sin[0, :, :half], atol=1e-5, rtol=0)
