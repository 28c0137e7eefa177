"""Gemma 3 (text: Gemma3ForCausalLM, the 1B model and the text part of the larger ones): Gemma 2
(models/gemma2.py) with (1 + w) RMSNorm on q and k per head, no soft-capping, five local
(sliding-window) layers to one global (`layer_types`), and two ropes: the global layers use
`rope_theta` (1M) with the config's scaling (linear x8 on the 4B+ models), the local ones their
own base (`rope_local_base_freq`, 10k) unscaled."""

from __future__ import annotations

import torch

from kernels import KernelOps, build_rope_cache
from services.worker.model_config import ModelConfig
from services.worker.models.gemma2 import Gemma2ForCausalLM, GemmaAttention


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.qk_norm, "Gemma 3 always has q/k norms (model_config sets qk_norm)"
        super().__init__(cfg, ops)

    def build_rope_cache(self, max_position: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The global layers' table (the step's cos_sin_cache); the local layers get theirs here."""
        cfg = self.config
        if cfg.rope_local_theta:
            local = build_rope_cache(
                cfg.head_dim, max_position, cfg.rope_local_theta, cfg.rope_local_scaling, dtype, device
            )
            for i, layer in enumerate(self.model.layers):
                attn = layer.self_attn
                assert isinstance(attn, GemmaAttention)
                attn.rope_cache = local if cfg.layer_types[i] == "sliding_attention" else None
        return super().build_rope_cache(max_position, dtype, device)
