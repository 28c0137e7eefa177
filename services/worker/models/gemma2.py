"""Gemma 2: Llama-style attention and a gated MLP, with

- sandwich norms: each block's input and output are normalised (input / post-attention,
  pre / post-feedforward), the residual stream adds the normalised output;
- RMSNorm scaled by (1 + w) (the checkpoint stores w), in fp32 as transformers does;
- embeddings scaled by sqrt(hidden_size) (rounded to the model dtype first, as transformers);
- GELU (tanh approximation) in the MLP;
- attention scale query_pre_attn_scalar ** -0.5, attention scores soft-capped
  (cap * tanh(s / cap), `attn_logit_softcapping`) and so are the final logits
  (`final_logit_softcapping`);
- a sliding window on every other layer (`layer_types`; the first layer slides).

Gemma 3 (models/gemma3.py) is the same module with q/k norms and a second rope for its local
layers. Norm folding does not apply (the norms sit on both sides of each block); instead each norm
runs fused with what is next to it (the `gemma_*` ops of kernels/ops.py), so a layer launches
few kernels: the residual stream `h` flows through the sandwich steps

    x = norm_input(h)                              (the previous layer's last fused step)
    h = h + norm_post_attn(attn(x)); x = norm_pre_ff(h)       one gemma_add_rms_norm
    h = h + norm_post_ff(mlp(x));    x = norm_input'(h)       one gemma_add_rms_norm

where norm_input' is the next layer's input norm, or after the last layer the final norm; the
first layer's input norm runs with the embedding scale (gemma_scale_rms_norm). Gemma 3's q/k norms
are one launch (gemma_qk_norm), the MLP's GELU(tanh)-and-mul one (or the gate/up GEMM's epilogue).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.attention import AttentionMetadata, RMSNorm
from services.worker.layers.linear import Linear
from services.worker.model_config import ModelConfig, ModelConfigError
from services.worker.models.llama import Attention, LlamaForCausalLM, LlamaModel
from services.worker.parallel import shard_layout


class GemmaRMSNorm(RMSNorm):
    """x * rsqrt(mean(x**2) + eps) * (1 + w), all in fp32, rounded once (transformers' Gemma norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.gemma_rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view_as(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("Gemma's residual adds are `sandwich` steps (gemma_add_rms_norm)")

    def sandwich(
        self, y: torch.Tensor, residual: torch.Tensor, next_norm: GemmaRMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, residual [T, H]) -> (next_norm(h), h) with h = residual + self(y): this norm on a
        block's output, the residual add and the next block's input norm, in one op."""
        return self.ops.gemma_add_rms_norm(y, residual, self.weight, next_norm.weight, self.eps)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ModelConfigError(f"Gemma with hidden_activation {cfg.hidden_act!r} is not supported")
        self.ops = ops
        self.gate_up_proj = Linear(ops, cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(ops, cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if self.ops.linear_gelu_and_mul is not None and gate_up.lora is None and gate_up.quant_method is None:
            # (one kernel for a decode-sized x where faster: GELU in the GEMM's epilogue)
            return self.down_proj(self.ops.linear_gelu_and_mul(x, gate_up.weight, gate_up.bias))
        return self.down_proj(self.ops.gelu_tanh_and_mul(gate_up(x)))


class GemmaAttention(Attention):
    """Llama attention with (1 + w) q/k norms (Gemma 3) and, for layers with a rope of their own
    (Gemma 3's local layers), that rope's cos/sin table (`rope_cache`, set by build_rope_cache)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int) -> None:
        super().__init__(cfg, ops, layer)
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
        self.rope_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.rope_cache is not None:
            meta = dataclasses.replace(meta, cos_sin_cache=self.rope_cache)
        return super().forward(x, meta)

    def norm_qk(
        self, q: torch.Tensor, k: torch.Tensor, rms_input: torch.Tensor | None = None, rms_eps: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert rms_input is None, "Gemma's norms are never folded"
        if self.q_norm is None or self.k_norm is None:
            return q, k
        return self.ops.gemma_qk_norm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, ops, layer)
        self.mlp = GemmaMLP(cfg, ops)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(ops, cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(ops, cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(ops, cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(ops, cfg.hidden_size, eps)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, next_norm: GemmaRMSNorm, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x = input_layernorm(h), the residual stream h) -> (next_norm(h'), h'), h' the stream
        after this layer; next_norm: the next layer's input norm, or the final norm."""
        y = self.self_attn(x, meta)
        x, h = self.post_attention_layernorm.sandwich(y, h, self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm.sandwich(self.mlp(x), h, next_norm)


class GemmaModel(LlamaModel):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        nn.Module.__init__(self)  # LlamaModel's layers are not Gemma's: same attribute names, own modules
        self.ops = ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, ops, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.norms_folded = False
        self.init_step_hooks()
        self.embed_scale = cfg.hidden_size**0.5

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert inputs_embeds is None, "Gemma 2/3 here are text-only models"
        layers = [cast(GemmaDecoderLayer, layer) for layer in self.layers]
        first = layers[0].input_layernorm
        # the embedding scale (rounded to the dtype first) and the first layer's input norm
        x, h = self.ops.gemma_scale_rms_norm(
            self.embed_tokens(input_ids), self.embed_scale, first.weight, first.eps
        )
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            x, h = layer(x, h, next_norm, meta)
        return x  # the final norm's output (the last layer's sandwich step)


class SoftCappedLinear(Linear):
    """The LM head with cap * tanh(logits / cap) after it: every path that reads logits (the
    sampler, CUDA-graph decode outputs, prompt logprobs) sees the capped ones."""

    def __init__(self, ops: KernelOps, in_features: int, out_features: int, cap: float) -> None:
        super().__init__(ops, in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor, early_signal: bool = False) -> torch.Tensor:
        logits = super().forward(x)
        if self.cap <= 0:  # (Gemma 3: no soft-cap, nothing launched)
            return logits
        return self.ops.soft_cap(logits, self.cap)


class Gemma2ForCausalLM(LlamaForCausalLM):
    mlp_activation = "gelu_tanh"

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        nn.Module.__init__(self)  # its own model and LM head (see GemmaModel)
        self.config = cfg
        self.ops = ops
        self.layout = shard_layout(cfg)  # one rank: Gemma is not served by parallel groups
        self.model = GemmaModel(cfg, ops)
        self.lm_head = SoftCappedLinear(ops, cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def can_fold_norms(self) -> bool:
        return False  # sandwich norms: no projection directly follows a norm it could absorb
