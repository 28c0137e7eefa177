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
layers. Norm folding does not apply (the norms sit on both sides of each block).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
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
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x + residual
        return self.forward(total), total


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ModelConfigError(f"Gemma with hidden_activation {cfg.hidden_act!r} is not supported")
        self.gate_up_proj = Linear(ops, cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(ops, cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


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

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # residual stream in/out
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), meta))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(LlamaModel):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        nn.Module.__init__(self)  # LlamaModel's layers are not Gemma's: same attribute names, own modules
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
        h = self.embed_tokens(input_ids)
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # the scale rounded to the dtype first
        for layer in self.layers:
            h = layer(h, meta)
        return self.norm(h)


class SoftCappedLinear(Linear):
    """The LM head with cap * tanh(logits / cap) after it: every path that reads logits (the
    sampler, CUDA-graph decode outputs, prompt logprobs) sees the capped ones."""

    def __init__(self, ops: KernelOps, in_features: int, out_features: int, cap: float) -> None:
        super().__init__(ops, in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor, early_signal: bool = False) -> torch.Tensor:
        logits = super().forward(x)
        if self.cap <= 0:
            return logits
        return (torch.tanh(logits / self.cap) * self.cap).to(logits.dtype)


class Gemma2ForCausalLM(LlamaForCausalLM):
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
