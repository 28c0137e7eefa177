"""`KernelOps`: the interface of a kernel bundle (one implementation per backend).

Its own module so that a backend package (`kernels/triton/`) can build a bundle without importing
`kernels/__init__.py`, which picks the backend and so imports the backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass(frozen=True)
class QuantFusion:
    """What a quantized projection of the folded-norm decode path fuses into its GEMM (one tuning
    key each: `tune_quant_linear(..., fusion=)`; `quant_linear_fused`'s arguments)."""

    norm: bool = False  # x * the folded RMSNorm's weight (per input column) before the product
    rms: bool = False  # the sums times the row's rsqrt(mean(x^2) + eps) (else the attention kernel's)
    gated: bool = False  # silu(gate) * up of a fused [gate; up] weight: N / 2 columns out
    residual: bool = False  # the residual stream added before the one rounding

    def __str__(self) -> str:
        names = ("norm", "rms", "silu", "residual")
        flags = (self.norm, self.rms, self.gated, self.residual)
        return "+".join(n for n, f in zip(names, flags, strict=True) if f) or "plain"


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's shape as the decode kernel sees it (this rank's heads): what
    `tune_decode_attention` measures its launch configs for."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int = 0
    soft_cap: float = 0.0
    sinks: bool = False
    rms_hidden: int = 0  # > 0: the folded input norm's 1/rms is computed in the kernel (its width)

    def __str__(self) -> str:
        text = f"{self.num_q_heads}q/{self.num_kv_heads}kv x {self.head_dim}"
        return text + (f" window {self.sliding_window}" if self.sliding_window else "")


@dataclass(frozen=True)
class KernelOps:
    """A bundle of kernel implementations; the comments give each signature."""

    name: str  # "reference" | "triton"
    # (key [T, Hkv, D], value [T, Hkv, D], kv_cache_layer [2, NB, BS, Hkv, D], slot_mapping [T] int64, -1 = skip)
    write_kv_cache: Callable[..., None]
    # (q [T, Hq, D], kv_cache_layer, block_tables [B, max_blocks] int32, cu_seqlens_q [B+1] int32,
    #  seq_lens [B] int32, scale, max_seqlen_q, num_decode_rows=0, sliding_window=0, soft_cap=0.0,
    #  sinks=None) -> [T, Hq, D]; num_decode_rows: sequences [0, k) have one new token each (token
    #  i = sequence i), a hint for mixed steps; sliding_window W > 0: a query at p sees keys
    #  p - W < k <= p; soft_cap > 0: scores := soft_cap * tanh(scores / soft_cap) (Gemma 2);
    #  sinks [Hq]: a logit per head added to the softmax's denominator (gpt-oss)
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]  # (x [T, H], weight [H], eps) -> [T, H]
    # (x [T, H], residual [T, H], weight [H], eps) -> (normed [T, H], x + residual [T, H])
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (q [T, Hq, D], k [T, Hkv, D], positions [T] int64, cos_sin_cache [max_pos, D]) -> (q, k)
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]  # (x [T, 2*I]) -> [T, I]
    # (head_dim) -> whether a decode step built from these ops may be captured in a CUDA graph
    # (no host synchronisation inside; the reference attention reads sequence lengths on the host)
    graph_capturable: Callable[[int], bool] = lambda head_dim: False
    # Optional fusions (None: the model composes the ops above, exactly as before; the CPU path).
    # (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], kv_cache_layer, slot_mapping [T], positions [T],
    #  cos_sin_cache) -> rotated q [T, Hq, D]; rotated K and V written to their slots
    rotary_write_kv_cache: Callable[..., torch.Tensor] | None = None
    # (q, k, v, kv_cache_layer, slot_mapping, positions, cos_sin_cache, block_tables, cu_seqlens_q,
    #  seq_lens, scale, max_seqlen_q, rms_input=None, rms_eps=0.0, num_decode_rows=0,
    #  sliding_window=0, soft_cap=0.0, sinks=None) -> [T, Hq, D]:
    #  `rotary_write_kv_cache` then `paged_attention`
    #  (a decode step does all of it in one kernel)
    rotary_write_attention: Callable[..., torch.Tensor] | None = None
    # (max_seqlen_q, head_dim, dtype, num_tokens) -> whether `rotary_write_attention(..., rms_input=h,
    # rms_eps)` applies h's RMS scale inside its one decode kernel (a folded model then skips the norm)
    attention_scales_rms: Callable[[int, int, torch.dtype, int], bool] = lambda *args: False
    # (x [T, K], weight [N, K], bias [N] | None, early_signal=False) -> [T, N]: F.linear, or a
    # skinny-GEMM kernel for small T where `tune_linear` measured it faster on this GPU (which, with
    # early_signal, lets the next kernel launch while it runs: kernels/triton/pdl.py)
    linear: Callable[..., torch.Tensor] | None = None
    # (weights: list of [N, K] tensors of one shape, bias or None, max_rows) -> report lines: times
    # F.linear against the kernel for T = 1, 2, 4, ... max_rows and remembers the faster per shape
    tune_linear: Callable[..., list[str]] | None = None
    # (logits [R, V]) -> [R] int64, torch.argmax(logits, -1) (greedy rows of a decode graph)
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (values [R, V], k) -> ([R, k] fp32, [R, k] int64): each row's top k, best first, equal values
    #   in index order (a stable descending sort's first k): beam search's pass over the vocabulary
    row_topk: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # (values [G*W, >=PB], ids, scores [G*W] fp64, stops [G, S], W, PB, keep) -> (table [G, keep, 4],
    #   parents [G, W], tokens [G, W], totals [G, W]): beam search's candidate selection per request
    #   (services/worker/beam_select.select_beams' second stage without bans or padding)
    beam_candidates: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = (
        None
    )
    # (rows [G*W, V] fp32, scores [G*W] fp64, stops [G, S], W, k, PB, keep) -> (values [G*W, k],
    #   ids [G*W, k], table, parents, tokens, totals): row_topk and beam_candidates in one launch
    beam_topk_candidates: (
        Callable[
            ..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ]
        | None
    ) = None
    # (parents [G, W], tokens [G, W], slot_tables [G, W, w], places [n], shared [n], tails [n],
    #   max_blocks, ids [T] | None, positions [n] | None) -> (tables [n, max_blocks] int32, src [n],
    #   ids): the inputs of a beam step launched ahead (services/worker/beam_step.BeamStep.ahead)
    beam_ahead: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # (probs [R, V] fp32, draws [R, 3] int64) -> [R] int64: the sampler's exponential race,
    #   services/worker/sampling_rng.exponential_race (its definition) in one pass
    exponential_race: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # "Folded RMSNorm" decode path: with all three below (and a dtype other than fp16) the loader
    # folds each layer's two norm weights into the next projection (W' = W * g[None, :]) and the
    # layer's two RMSNorm kernels disappear (launches that weigh in a batch-1 step; docs/gpu.md);
    # the per-row 1/rms is computed by the kernels that read the raw residual stream instead.
    # All fp32 math, one rounding to the input dtype at the end.
    # (x [T, K], weight [N, K], bias [N] | None, eps) -> [T, N]:
    #   F.linear(x * rsqrt(mean(x**2, -1) + eps), weight, bias) (an RMSNorm with no weight, then linear)
    linear_rms_norm: Callable[..., torch.Tensor] | None = None
    # (x [T, K], weight [N, K], bias [N] | None, residual [T, N]) -> [T, N]:
    #   residual + F.linear(x, weight, bias), a new tensor (residual is not written)
    linear_add: Callable[..., torch.Tensor] | None = None
    # (gate_up [T, 2*I], x [T, H], eps) -> [T, I]: with s = rsqrt(mean(x**2, -1) + eps) per row,
    #   silu(s * gate_up[:, :I]) * (s * gate_up[:, I:])
    silu_and_mul_rms: Callable[..., torch.Tensor] | None = None
    # (x [T, K], weight [2*I, K], bias [2*I] | None, rms_eps: float | None) -> [T, I]: the gate/up
    #   projection and SiLU-and-mul (`silu_and_mul`, or `silu_and_mul_rms(gate_up, x, rms_eps)`);
    #   one kernel for decode-sized inputs where measured faster (fp32 gate/up, not rounded between)
    linear_silu_and_mul: Callable[..., torch.Tensor] | None = None
    # Gemma 2/3 (models/gemma2.py): RMSNorm with scale (1 + w), statistics, scale and product in
    # fp32, rounded once (transformers' GemmaRMSNorm), and its fusions; reference twins on the CPU.
    # (x [T, H], weight [H], eps) -> [T, H]
    gemma_rms_norm: Callable[..., torch.Tensor] = reference.gemma_rms_norm
    # (y [T, H], residual [T, H], post_weight [H], pre_weight [H], eps) -> (normed, h):
    #   h = residual + gemma_rms_norm(y, post_weight), normed = gemma_rms_norm(h, pre_weight)
    gemma_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.gemma_add_rms_norm
    # (x [T, H], scale, weight [H], eps) -> (gemma_rms_norm(h, weight), h), h = x * scale (the
    #   scale rounded to x's dtype first: the embedding normaliser)
    gemma_scale_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.gemma_scale_rms_norm
    # The q/k head norms (Triton: kernels/triton/head_norm.py, all heads of q and k in one launch):
    # (q [T, Hq, D], k [T, Hkv, D], q_weight [D], k_weight [D], eps) -> (q, k) normed per head
    # with Gemma's (1 + w) weights (Gemma 3)
    gemma_qk_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.gemma_qk_norm
    # the same with plain RMSNorm weights (Qwen3 / Qwen3-MoE's q/k norms)
    qk_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.qk_rms_norm
    # (x [T, 2*I]) -> [T, I]: gelu_tanh(x[:, :I]) * x[:, I:]
    gelu_tanh_and_mul: Callable[..., torch.Tensor] = reference.gelu_tanh_and_mul
    # (x [T, K], weight [2*I, K], bias [2*I] | None) -> [T, I]: the gate/up projection then
    #   `gelu_tanh_and_mul`; one kernel for one row where measured faster (`linear_silu_and_mul`'s
    #   GELU sibling; fp32 gate/up, not rounded between). None: the model composes the two
    linear_gelu_and_mul: Callable[..., torch.Tensor] | None = None
    # (x [...], cap > 0) -> cap * tanh(x / cap) in fp32, rounded once (Gemma 2's final logits)
    soft_cap: Callable[..., torch.Tensor] = reference.soft_cap
    # (x [T, H], w13 [E, 2*I, H], w2 [E, H, I], topk_weights [T, k] fp32, topk_ids [T, k],
    #  w13_bias [E, 2*I] | None = None, w2_bias [E, H] | None = None, activation="silu") -> [T, H]:
    #   a mixture-of-experts feed-forward over each token's routed experts (Qwen3-MoE, Mixtral;
    #   gpt-oss: biases and activation "swiglu_oai")
    fused_moe: Callable[..., torch.Tensor] = reference.fused_moe
    # (logits [T, E], top_k, scoring "softmax_topk" | "topk_softmax", renormalize) -> (weights
    #  [T, k] fp32, ids [T, k] int64): each token's experts (reference.moe_route: Qwen3-MoE and
    #  Mixtral take the top k of the softmax, gpt-oss the softmax of the top k logits);
    #  rms_input [T, H], rms_eps: the logits of a folded norm's raw stream, scaled by its 1/rms first
    moe_route: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.moe_route
    # (x [T, H], router_weight [E, H], router_bias [E] | None, top_k, scoring, renormalize,
    #  rms_eps=None) -> (weights, ids): the router's logits F.linear(x, w, b) then `moe_route`
    #  (rms_eps: x is a folded norm's raw stream); one launch for decode-sized x on the GPU
    #  (kernels/triton/moe_route.py), no separate router GEMM
    moe_router: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.moe_router
    # (w13s: every MoE layer's [E, 2*I, H], w2s, w13_biases or None, w2_biases or None, top_k,
    #  activation, name) -> report lines: times the decode MoE kernels' tile configs at batch 1 and
    #  keeps the fastest for fused_moe (None: nothing to tune)
    tune_moe: Callable[..., list[str]] | None = None
    # (shapes: list[AttentionShape], dtype, device, max_batch) -> report lines: times the decode
    #  attention kernel's launch configs per shape and batch bucket in CUDA graphs and keeps the
    #  fastest for every later decode call of that shape (None: nothing to tune)
    tune_decode_attention: Callable[..., list[str]] | None = None
    # (x [M, K], qweight, scales [N, G] fp32, bits 8 | 4, zeros [N, G] | None, bias [N] | None) ->
    #   [M, N] in x's dtype: a GEMM with int8 or packed 4-bit weights dequantized per group
    #   (layouts: reference.dequantize_weight; services/worker/layers/quantization/)
    quant_linear: Callable[..., torch.Tensor] = reference.quant_linear
    # (weights: list of packed weights of one shape, scales: list of [N, G], zeros: list or None,
    #  bits, bias or None, name, fusion: QuantFusion | None = None) -> report lines: times
    #  `quant_linear`'s tile configs per row bucket and keeps the fastest (with `fusion`: those of
    #  `quant_linear_fused` calls of that variant) (None: nothing to tune, the defaults)
    tune_quant_linear: Callable[..., list[str]] | None = None
    # The folded-norm decode path of a quantized model (services/worker/models/llama.py fold_norms):
    # (x [T, K], qweight, scales, bits, zeros, bias, norm_weight [K] | None = None, rms_eps = None,
    #  gated = False, residual [T, N] | None = None, early_signal = False) -> [T, N] ([T, N/2]
    #  gated): reference.quant_linear_fused, one launch (norm weight, 1/rms, SiLU-and-mul or the
    #  residual add inside the quantized GEMM); the tile config `tune_quant_linear(fusion=...)` chose
    quant_linear_fused: Callable[..., torch.Tensor] = reference.quant_linear_fused
    # W8A8 FP8 (on GPUs with FP8 tensor cores; None: the caller's `torch._scaled_mm` path):
    # (x [T, K] bf16, weight [N, K] float8_e4m3fn, weight_scale [N, 1] fp32, bias [N] | None) ->
    #   [T, N]: x quantized per token, reference.fp8_w8a8_linear; the Triton FP8 GEMM or
    #   `_scaled_mm`, whichever `tune_fp8_linear` measured faster for the shape and row count
    fp8_linear: Callable[..., torch.Tensor] | None = None
    # (weights: list of [N, K] e4m3 of one shape, scales: list of [N, 1], bias or None, name) ->
    #   report lines: times `_scaled_mm` against the Triton configs per row bucket, keeps the choice
    tune_fp8_linear: Callable[..., list[str]] | None = None
    # Multi-LoRA, one launch each for the whole batch (rows grouped by adapter slot; layouts in
    # kernels/reference.py): (x [T, K], lora_a [S, R, K], sorted_token_ids [>= T] int32,
    #   seg_starts [S] int32, seg_lens [S] int32) -> t [P, T, R] fp32: P partial sums over K
    lora_shrink: Callable[..., torch.Tensor] = reference.lora_shrink
    # (y [T, N], t [P, T, R] fp32, lora_b [S, N, R], sorted_token_ids, seg_starts, seg_lens) -> None:
    #   y[i] += (sum_p t[p, i]) @ B[slot(i)]^T in place for every row i that has an adapter;
    #   part_starts=(0, c1[, c2]), part_rank=R: a fused projection whose part j (output columns from
    #   c_j) uses only t's rank columns [j*R, (j+1)*R); lora_b is then [S, N, R]: each column's own
    #   part's B (no zeros stored for the other parts)
    lora_expand: Callable[..., None] = reference.lora_expand

    @property
    def folds_norms(self) -> bool:
        """Whether the bundle has the three ops of the folded-RMSNorm decode path."""
        return (
            self.linear_rms_norm is not None
            and self.linear_add is not None
            and self.silu_and_mul_rms is not None
        )
