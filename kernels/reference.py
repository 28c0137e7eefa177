"""PyTorch reference twins of every kernel in `kernels/`.

These are the numerical ground truth the Triton kernels are tested against, and the
implementation the worker uses on the CPU. They favour clarity over speed, but stay
vectorised where it is free so a CPU worker serving a tiny model is usable.

Conventions (the kernel API; kernels/__init__.py bundles these as KernelOps):
- KV cache layer view: [2, num_blocks, block_size, num_kv_heads, head_dim]; index 0 = K, 1 = V.
  A token's slot is `block_id * block_size + offset`.
- Every function computes in its input dtype, accumulating in fp32 where it matters
  (softmax, norms, rotary), and returns tensors of the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip (padding tokens)
) -> None:
    """Scatter each token's K and V into its slot of the paged cache, in place."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    assert key.shape == value.shape and key.shape[1:] == (num_kv_heads, head_dim), (key.shape, value.shape)
    assert slot_mapping.shape == (key.shape[0],), slot_mapping.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat = kv_cache_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0, slots] = key[keep].to(kv_cache_layer.dtype)
    flat[1, slots] = value[keep].to(kv_cache_layer.dtype)


def gather_kv(
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` K and V rows of one sequence, gathered from its blocks: ([S, Hkv, D], [S, Hkv, D])."""
    block_size = kv_cache_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache_layer[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache_layer[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32: cached + new tokens of each sequence
    scale: float,
    max_seqlen_q: int,
    num_decode_rows: int = 0,  # a hint for kernels (sequences [0, k) have one new token); unused here
    sliding_window: int = 0,  # > 0: a query at position p sees keys at positions > p - sliding_window
    soft_cap: float = 0.0,  # > 0: scores := soft_cap * tanh(scores / soft_cap) (Gemma 2)
    sinks: torch.Tensor | None = None,  # [Hq]: a learned logit per head in the softmax (gpt-oss)
    out: torch.Tensor | None = None,  # [T, Hq, D] to write into (default: a new tensor)
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new queries over its whole (paged) context.

    Query i of sequence b sits at position seq_lens[b] - q_len_b + i and attends to every kv
    position <= its own (and, with a sliding window W, > its own - W: W keys including itself,
    as transformers' sliding-window mask). GQA: q head h reads kv head h // (Hq // Hkv).
    Soft-capping applies to the scaled scores, before the mask and the softmax.
    Attention sinks (gpt-oss): head h's softmax has one more column, the logit sinks[h] (not
    scaled, no value row): probabilities exp(s_k) / (sum_j exp(s_j) + exp(sinks[h])).
    """
    del max_seqlen_q  # only a launch-size hint for the kernels
    num_tokens, num_q_heads = q.shape[0], q.shape[1]
    num_kv_heads = kv_cache_layer.shape[3]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        assert seq_len >= q_len, f"sequence {b}: seq_len {seq_len} < q_len {q_len}"
        k, v = gather_kv(kv_cache_layer, block_tables[b], seq_len)  # [S, Hkv, D]
        qb = q[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        kb = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        vb = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [Hq, q_len, S]
        if soft_cap > 0:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] > q_pos[:, None]  # [q_len, S]: future positions
        if sliding_window > 0:  # and positions that fell out of the window
            mask |= k_pos[None, :] <= q_pos[:, None] - sliding_window
        scores.masked_fill_(mask, float("-inf"))
        if sinks is not None:  # the sink column joins the softmax, then is dropped
            sink_col = sinks.float()[:, None, None].expand(num_q_heads, q_len, 1)
            probs = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, vb).transpose(0, 1).to(q.dtype)
    if num_tokens > cu[-1]:
        out[cu[-1] :] = 0  # padding rows past the last sequence
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, normalised in fp32 and multiplied by the weight in the input dtype (as HF does)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual stream update and the next norm in one pass."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def rotary(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX / HF-Llama rotary embedding (rotate_half), returning new tensors."""
    half = cos_sin_cache.shape[1] // 2
    assert q.shape[-1] == 2 * half and k.shape[-1] == 2 * half, (q.shape, k.shape, cos_sin_cache.shape)
    cs = cos_sin_cache[positions.long()].float()
    cos = cs[:, None, :half]  # [T, 1, D/2]
    sin = cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_write_kv_cache(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D]
    out: torch.Tensor | None = None,  # [T, Hq, D] to write the rotated q into (default: a new tensor)
) -> torch.Tensor:  # [T, Hq, D] rotated q
    """`rotary` then `write_kv_cache` of the rotated K and V, returning the rotated q."""
    q_rot, k_rot = rotary(q, k, positions, cos_sin_cache)
    write_kv_cache(k_rot, v, kv_cache_layer, slot_mapping)
    return q_rot if out is None else out.copy_(q_rot)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T + bias [N] -> [T, N] (torch's F.linear)."""
    return F.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x of shape [T, 2*I]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:  # x [T, H] -> [T, 1] fp32
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear_rms_norm(
    x: torch.Tensor,  # [T, K]: the raw residual stream
    weight: torch.Tensor,  # [N, K]: the projection with the norm weight folded in (W * g[None, :])
    bias: torch.Tensor | None,  # [N], added after the scale (Qwen2's qkv bias)
    eps: float,
) -> torch.Tensor:  # [T, N]
    """F.linear(x * rsqrt(mean(x**2, -1) + eps), weight, bias): an RMSNorm without weight, then the
    projection; fp32 math, rounded once to x's dtype."""
    normed = x.float() * _inv_rms(x, eps)
    return F.linear(normed, weight.float(), _float_or_none(bias)).to(x.dtype)


def linear_add(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    residual: torch.Tensor,  # [T, N]
) -> torch.Tensor:  # [T, N], a new tensor
    """residual + F.linear(x, weight, bias): a projection and the residual add; fp32 math, rounded
    once to x's dtype (residual is not written)."""
    out = F.linear(x.float(), weight.float(), _float_or_none(bias))
    return (residual.float() + out).to(x.dtype)


def silu_and_mul_rms(
    gate_up: torch.Tensor,  # [T, 2*I]: the gate/up projection of the raw residual stream
    x: torch.Tensor,  # [T, H]: that residual stream
    eps: float,
) -> torch.Tensor:  # [T, I]
    """silu(s * gate) * (s * up) with s = rsqrt(mean(x**2, -1) + eps) per row: SiLU-and-mul after
    a gate/up projection whose input norm was folded away; fp32 math, rounded once."""
    inter = gate_up.shape[-1] // 2
    s = _inv_rms(x, eps)
    gf = gate_up.float()
    gate, up = gf[..., :inter] * s, gf[..., inter:] * s
    return (F.silu(gate) * up).to(gate_up.dtype)


def linear_silu_and_mul(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [2*I, K]: the fused [gate; up] projection
    bias: torch.Tensor | None,  # [2*I]
    rms_eps: float | None = None,
) -> torch.Tensor:  # [T, I]
    """silu(gate) * up of F.linear(x, weight, bias) = [gate, up], on the fp32 sums (not rounded in
    between), rounded once; with rms_eps, gate and up are first scaled by rsqrt(mean(x**2) + rms_eps)
    per row (x is the raw residual stream, the norm's weight folded into `weight`)."""
    gate_up = F.linear(x.float(), weight.float(), _float_or_none(bias))
    if rms_eps is not None:
        gate_up = gate_up * _inv_rms(x, rms_eps)
    inter = gate_up.shape[-1] // 2
    return (F.silu(gate_up[..., :inter]) * gate_up[..., inter:]).to(x.dtype)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[:, :I]) * x[:, I:] for x of shape [T, 2*I] (Gemma's MLP, as transformers computes it)."""
    inter = x.shape[-1] // 2
    return F.gelu(x[..., :inter], approximate="tanh") * x[..., inter:]


def linear_gelu_and_mul(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [2*I, K]: the fused [gate; up] projection
    bias: torch.Tensor | None,  # [2*I]
) -> torch.Tensor:  # [T, I]
    """gelu_tanh(gate) * up of F.linear(x, weight, bias) = [gate, up], on the fp32 sums (not
    rounded in between), rounded once: the skinny GEMM's GELU epilogue (`linear_silu_and_mul`'s twin)."""
    gate_up = F.linear(x.float(), weight.float(), _float_or_none(bias))
    inter = gate_up.shape[-1] // 2
    return (F.gelu(gate_up[..., :inter], approximate="tanh") * gate_up[..., inter:]).to(x.dtype)


# --- Gemma's RMSNorm: x * rsqrt(mean(x**2) + eps) * (1 + w), all in fp32, rounded once ---------


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x [..., H], weight [H], eps) -> [..., H]: transformers' GemmaRMSNorm (the checkpoint stores
    w, the scale is 1 + w; statistics, scale and product in fp32, rounded once to x's dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def gemma_add_rms_norm(
    y: torch.Tensor,  # [T, H]: a block's output (attention or MLP)
    residual: torch.Tensor,  # [T, H]: the residual stream
    post_weight: torch.Tensor,  # [H]: the block's output norm (post-attention / post-feedforward)
    pre_weight: torch.Tensor,  # [H]: the next block's input norm (pre-feedforward / next input / final)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's sandwich step: h = residual + norm_post(y) (rounded to the dtype, as transformers'
    add), returns (norm_pre(h), h)."""
    h = residual + gemma_rms_norm(y, post_weight, eps)
    return gemma_rms_norm(h, pre_weight, eps), h


def gemma_scale_rms_norm(
    x: torch.Tensor, scale: float, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, H] embeddings, scale, weight, eps) -> (gemma_rms_norm(h), h) with h = x * scale, the
    scale rounded to x's dtype first (transformers' Gemma embedding normaliser)."""
    h = x * torch.tensor(scale, dtype=x.dtype)
    return gemma_rms_norm(h, weight, eps), h


def gemma_qk_norm(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 3's per-head q and k norms: (gemma_rms_norm(q, q_weight), gemma_rms_norm(k, k_weight))."""
    return gemma_rms_norm(q, q_weight, eps), gemma_rms_norm(k, k_weight, eps)


def qk_rms_norm(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
    rms_input: torch.Tensor | None = None,  # [T, H] (folded input norm, below)
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q and k norms: (rms_norm(q, q_weight), rms_norm(k, k_weight)).

    Folded input norm: q, k are projections of the raw residual stream h (`rms_input`), i.e. rms(h)
    times the normalised input's; with s = rsqrt(mean(h**2) + rms_eps) per token this returns
    rms_norm(s * q, q_weight) / s (and k's), which the decode attention kernel, told rms_input too,
    multiplies by s again (with v): q/k/v then are those of the unfolded layer."""
    if rms_input is None:
        return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    s = _inv_rms(rms_input, rms_eps)[:, :, None]  # [T, 1, 1]
    return tuple(  # type: ignore[return-value]
        (rms_norm(x.float() * s, w, eps) / s).to(x.dtype) for x, w in ((q, q_weight), (k, k_weight))
    )


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in fp32, rounded once to x's dtype (Gemma 2's final-logit soft-cap)."""
    return (torch.tanh(x.float() / cap) * cap).to(x.dtype)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, head_dim: int, base: float, scaling: dict[str, Any]
) -> torch.Tensor:
    """YaRN's blend of interpolated and extrapolated frequencies (transformers' `_compute_yarn_parameters`)."""
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, exactly as transformers' rope init functions compute them
    (for `longrope` the short factors, for `dynamic` the unscaled ones: positions within the
    original context; `build_rope_cache` handles the positions past it)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope_type_of(scaling)
    if rope_type in ("default", "dynamic"):
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, base, scaling)
    if rope_type in ("longrope", "su"):
        return _longrope_inv_freq(head_dim, base, scaling["short_factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise NotImplementedError(
        f"rope scaling type {rope_type!r} is not supported "
        "(default, linear, llama3, yarn, dynamic, longrope are)"
    )


def _longrope_inv_freq(head_dim: int, base: float, factors: list[float]) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponent)


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor transformers multiplies cos and sin by (YaRN, LongRoPE; 1 for the others).
    `factor` must be set (model_config derives it from the context lengths where a config omits it)."""
    rope_type = rope_type_of(scaling)
    if rope_type not in ("yarn", "longrope", "su"):
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    if rope_type == "yarn":
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        return get_mscale(factor)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def build_rope_cache(
    head_dim: int,
    max_position: int,
    base: float,
    scaling: dict[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:  # [max_position, head_dim]: cos in [:, :D/2], sin in [:, D/2:]
    """The cos/sin table for `rotary`, computed in fp32 like HF's rotary embedding, then cast to `dtype`.

    One table serves every sequence, so the two scalings whose frequencies transformers picks by
    the current sequence length are chosen once, by the table's length (the served context):
    `longrope` uses its short factors when the table fits `original_max_position_embeddings` and
    its long ones everywhere otherwise (transformers recomputes a sequence that outgrows the
    original context with the long factors: the same rotation from then on); `dynamic` NTK is the
    plain rope within the original context and the NTK base for the table's length beyond it."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    rope_type = rope_type_of(scaling)
    if rope_type in ("longrope", "su", "dynamic") and scaling is not None:
        original = int(scaling["original_max_position_embeddings"])
        if max_position > original and rope_type == "dynamic":
            factor = float(scaling["factor"])
            ntk_base = base * ((factor * max_position / original) - (factor - 1)) ** (
                head_dim / (head_dim - 2)
            )
            inv_freq = rope_inv_freq(head_dim, ntk_base, None)
        elif max_position > original:
            inv_freq = _longrope_inv_freq(head_dim, base, scaling["long_factor"])
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_pos, D/2]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rope_attention_factor(scaling)
    return cache.to(dtype=dtype, device=device)


# gpt-oss's clamped SwiGLU (transformers' GptOssExperts: alpha and limit are constants there)
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
MOE_ACTIVATIONS = ("silu", "swiglu_oai")


def swiglu_oai(x: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss's activation of x = [gate, up] [T, 2*I] -> [T, I]: gate clamped above at `limit`,
    up to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate), in x's dtype."""
    inter = x.shape[-1] // 2
    gate = x[..., :inter].clamp(max=limit)
    up = x[..., inter:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def moe_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """[T, 2*I] gate/up -> [T, I] by the named activation ("silu": SiLU-and-mul, "swiglu_oai")."""
    if activation == "silu":
        return silu_and_mul(x)
    if activation == "swiglu_oai":
        return swiglu_oai(x)
    raise ValueError(f"unknown MoE activation {activation!r} (one of {', '.join(MOE_ACTIVATIONS)})")


MOE_SCORINGS = ("softmax_topk", "topk_softmax")


def moe_route(
    logits: torch.Tensor,  # [T, E] router logits (any float dtype)
    top_k: int,
    scoring: str = "softmax_topk",  # one of MOE_SCORINGS
    renormalize: bool = False,  # softmax_topk: the k weights divided by their sum (norm_topk_prob)
    rms_input: torch.Tensor | None = None,  # [T, H] (folded norm, below)
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, k] fp32, expert ids [T, k] int64)
    """Each token's k experts and their routing weights.

    softmax_topk (Qwen3-MoE, Mixtral): the top k of softmax(logits) in fp32, renormalised to sum
    to 1 when `renormalize`. topk_softmax (gpt-oss): the top k logits, then a softmax over them.
    Folded norm: with `rms_input` (the raw residual stream a bias-free router read, the norm's
    weight in its weight), each row's logits are first scaled by rsqrt(mean(rms_input**2) + eps)."""
    if rms_input is not None:
        acc = torch.promote_types(logits.dtype, torch.float32)
        xf = rms_input.to(acc)
        logits = logits.to(acc) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_eps)
    if scoring == "softmax_topk":
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    if scoring == "topk_softmax":
        top, ids = logits.topk(top_k, dim=-1)
        return torch.softmax(top.float(), dim=-1), ids
    raise ValueError(f"unknown MoE scoring {scoring!r} (one of {', '.join(MOE_SCORINGS)})")


def moe_router(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H] the router's weight
    bias: torch.Tensor | None,  # [E]
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, k] fp32, expert ids [T, k] int64)
    """The router's logits F.linear(x, weight, bias) in x's dtype, then `moe_route` (with
    `rms_eps`: x is the raw residual stream a folded norm's router reads, its logits scaled by
    1/rms(x) as moe_route's rms_input). One kernel on the GPU for decode-sized x."""
    logits = F.linear(x, weight, bias)
    if rms_eps is None:
        return moe_route(logits, top_k, scoring, renormalize)
    return moe_route(logits, top_k, scoring, renormalize, rms_input=x, rms_eps=rms_eps)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2*I, H]: each expert's [gate; up] projection
    w2: torch.Tensor,  # [E, H, I]: each expert's down projection
    topk_weights: torch.Tensor,  # [T, k] fp32 routing weights
    topk_ids: torch.Tensor,  # [T, k] int: the experts each token is routed to
    w13_bias: torch.Tensor | None = None,  # [E, 2*I] (gpt-oss)
    w2_bias: torch.Tensor | None = None,  # [E, H]
    activation: str = "silu",  # see moe_activation
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream (see below)
    residual: torch.Tensor | None = None,  # [T, H], added to the output (not written)
) -> torch.Tensor:  # [T, H] in x's dtype
    """A mixture-of-experts feed-forward: sum_j w[t, j] * down_e(act(gate_e(x_t), up_e(x_t))) with
    e = topk_ids[t, j] (the biases inside each projection, before the routing weight). Each expert
    runs once, on the tokens routed to it; fp32 accumulation.

    Folded norm (decode, models/llama.py `fold_norms`): with `rms_eps`, x is the raw residual
    stream and gate/up are scaled by its per-row rsqrt(mean(x**2) + eps) (the norm's weight is in
    w13's columns), before the bias; with `residual`, the output is residual + the sum, rounded
    once."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    acc = torch.promote_types(x.dtype, torch.float32)  # (fp64 where a test asks for it)
    inv_rms = None if rms_eps is None else torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + rms_eps)
    for expert in topk_ids.unique().tolist():
        rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if inv_rms is not None:
            h = ((x[rows].to(acc) @ w13[expert].t().to(acc)) * inv_rms[rows]).to(x.dtype)  # [n, 2I]
        else:
            h = x[rows] @ w13[expert].t()  # [n, 2I]
        if w13_bias is not None:
            h = h + w13_bias[expert]
        y = moe_activation(h, activation) @ w2[expert].t()  # [n, H]
        if w2_bias is not None:
            y = y + w2_bias[expert]
        out.index_add_(0, rows, y.float() * topk_weights[rows, slots, None].float())
    if residual is not None:
        out += residual.float()
    return out.to(x.dtype)


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, bits: int, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 [N, K] weight of a quantized one (the layout of `quant_linear`).

    qweight: int8 [N, K] (bits=8, symmetric) or uint8 [N, K // 2] (bits=4, two values a byte,
    the even k in the low nibble); scales [N, G] fp32 with G groups of K // G consecutive
    columns (G = 1: per output channel); zeros [N, G] fp32 or None (0 for int8, 8 for 4-bit).
    w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = k // (K // G)."""
    if bits == 8:
        q = qweight.float()
    elif bits == 4:
        packed = qweight.to(torch.int32)
        q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(qweight.shape[0], -1).float()
    else:
        raise ValueError(f"quant_linear: unsupported bits={bits} (8 or 4)")
    group_size = q.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)
    if zeros is not None:
        q = q - zeros.float().repeat_interleave(group_size, dim=1)
    elif bits == 4:
        q = q - 8.0
    return q * s


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantize_weight(...).T (+ bias) -> [M, N] in x's dtype, fp32 math (W8A16 / W4A16)."""
    w = dequantize_weight(qweight, scales, bits, zeros)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quant_linear_fused(
    x: torch.Tensor,  # [M, K]: the raw residual stream where norm_weight / rms_eps are given
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,  # [K]: the folded RMSNorm's weight
    rms_eps: float | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,  # [M, N]
    early_signal: bool = False,  # (the Triton kernel's PDL signal; nothing here)
) -> torch.Tensor:  # [M, N], or [M, N / 2] gated
    """`quant_linear` with the folded-norm decode path's fusions (the quantized twin of
    `linear_rms_norm`, `linear_add` and `linear_silu_and_mul`), fp32 math, rounded once:
    y = (x * norm_weight) @ W.T, times rsqrt(mean(x**2) + rms_eps) of each row of x, + bias; gated
    (W is the fused [gate; up]): silu(y[:, :N/2]) * y[:, N/2:]; + residual. The norm weight meets
    x, not W: the quantized codes stay those of the checkpoint (exact for every format)."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * norm_weight.float()
    out = xf @ dequantize_weight(qweight, scales, bits, zeros).t()
    if rms_eps is not None:
        out = out * _inv_rms(x, rms_eps)
    if bias is not None:
        out = out + bias.float()
    if gated:
        half = out.shape[-1] // 2
        out = F.silu(out[:, :half]) * out[:, half:]
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only FP8: x [M, K] @ (weight [N, K] float8_e4m3fn * weight_scale [N, 1] fp32).T (+ bias),
    fp32 math, x's dtype out (the path where the device has no FP8 tensor cores)."""
    w = weight.float() * weight_scale.float().reshape(-1, 1)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 activations: (float8_e4m3fn [M, K], fp32 scales [M, 1]) of x [M, K],
    scale = max |x| of the row times fp32(1 / 448) (a zero row: 1e-12 of it), codes = x / scale
    (IEEE division) rounded to nearest even and saturated to +-448; x ~ codes * scale. The scale
    is one fp32 multiply, not a division, because that is what torch itself computes for a tensor
    divided by a Python number on CUDA (a reciprocal multiply) and on the CPU a true division: one
    definition that the Triton kernels and both devices reproduce bit for bit (docs/gpu.md)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * (1.0 / FP8_E4M3_MAX)
    codes = (x32 / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 FP8: x [M, K] quantized per token (`quantize_per_token_fp8`), times weight [N, K]
    float8_e4m3fn with weight_scale [N, 1] fp32 per output channel: (codes_x @ codes_w.T) * x_scale
    * w_scale.T (+ bias) in fp32, x's dtype out. The twin of kernels/triton/fp8_gemm.py (and of
    `torch._scaled_mm` with row-wise scales, up to its summation order)."""
    codes, x_scale = quantize_per_token_fp8(x)
    out = (codes.float() @ weight.float().t()) * x_scale * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- Multi-LoRA (punica / S-LoRA style): every row of one batch applies its own adapter ---------
# Layout shared with kernels/triton/lora.py: the batch's tokens are grouped by adapter slot.
# sorted_token_ids [T] int32 lists the rows of slot 0, then slot 1, ... (rows of no adapter are not
# listed in any segment); slot s owns sorted_token_ids[seg_starts[s] : seg_starts[s] + seg_lens[s]].


def lora_segments(token_slots: list[int], num_slots: int) -> tuple[list[int], list[int], list[int]]:
    """(sorted_token_ids, seg_starts, seg_lens) of a batch whose row i applies slot token_slots[i]
    (-1: no adapter), on the host: the rows of each slot in order, then the rows of no adapter."""
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    base: list[int] = []
    for row, slot in enumerate(token_slots):
        (base if slot < 0 else by_slot[slot]).append(row)
    starts: list[int] = []
    lens: list[int] = []
    ids: list[int] = []
    for rows in by_slot:
        starts.append(len(ids))
        lens.append(len(rows))
        ids += rows
    return ids + base, starts, lens


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]: each slot's stacked A matrices (zero rows past its rank)
    sorted_token_ids: torch.Tensor,  # [>= T] int32
    seg_starts: torch.Tensor,  # [S] int32
    seg_lens: torch.Tensor,  # [S] int32
) -> torch.Tensor:  # [P, T, R] fp32 partial sums (P = 1 here); rows of no adapter undefined (zeros here)
    """t[i] = x[i] @ A[slot(i)]^T for every row i that has an adapter, accumulated in fp32, as P
    partial sums over slices of K that `lora_expand` adds up (the kernel splits K; one here)."""
    num_slots, rank, k = lora_a.shape
    assert x.shape[1] == k and seg_starts.shape == seg_lens.shape == (num_slots,), (x.shape, lora_a.shape)
    out = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    for s, (start, n) in enumerate(zip(seg_starts.tolist(), seg_lens.tolist(), strict=True)):
        if n:
            rows = sorted_token_ids[start : start + n].long()
            out[rows] = x[rows].float() @ lora_a[s].float().T
    return out[None]


def lora_expand(
    y: torch.Tensor,  # [T, N], updated in place
    t: torch.Tensor,  # [P, T, R] fp32, lora_shrink's partial sums
    lora_b: torch.Tensor,  # [S, N, R]: each slot's B matrices, the adapter's scaling folded in
    sorted_token_ids: torch.Tensor,  # [>= T] int32
    seg_starts: torch.Tensor,  # [S] int32
    seg_lens: torch.Tensor,  # [S] int32
    # a fused projection's 2-3 parts: first output column of each; lora_b is then [S, N, part_rank],
    # each output column's B of its own part, which uses t's rank columns [j, j + 1) * part_rank
    part_starts: tuple[int, ...] = (),
    part_rank: int = 0,
) -> None:
    """y[i] += (sum_p t[p, i]) @ B[slot(i)]^T for every row i that has an adapter (with parts: B
    spread over each part's rank range of t, zeros elsewhere; the sum rounded to B's dtype first,
    as the kernel's tensor-core dot does; the add in fp32, rounded once to y's dtype)."""
    _, n_out, _ = lora_b.shape
    rank = t.shape[2]
    assert y.shape[1] == n_out and t.shape[1] == y.shape[0], (y.shape, t.shape, lora_b.shape)
    t = t.sum(0)
    if len(part_starts) > 1:  # B as the kernel uses it: [S, N, R], each part in its rank range
        assert lora_b.shape[2] == part_rank, (lora_b.shape, part_rank)
        full = torch.zeros(lora_b.shape[0], n_out, rank, dtype=lora_b.dtype, device=lora_b.device)
        bounds = [*part_starts, n_out]
        for j in range(len(part_starts)):
            cols = slice(bounds[j], bounds[j + 1])
            full[:, cols, j * part_rank : (j + 1) * part_rank] = lora_b[:, cols]
        lora_b = full
    assert lora_b.shape[2] == rank, (lora_b.shape, t.shape)
    for s, (start, n) in enumerate(zip(seg_starts.tolist(), seg_lens.tolist(), strict=True)):
        if n:
            rows = sorted_token_ids[start : start + n].long()
            delta = t[rows].to(lora_b.dtype).float() @ lora_b[s].float().T
            y[rows] = (y[rows].float() + delta).to(y.dtype)
