"""Qwen3 (dense): the Llama architecture with RMSNorm over head_dim on q and k before rotary."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.qk_norm, "Qwen3 always has q/k norm (model_config sets qk_norm)"
        super().__init__(cfg, ops)
