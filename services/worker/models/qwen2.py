"""Qwen2 / Qwen2.5: the Llama architecture with bias on q, k and v (often tied embeddings)."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.attention_bias, "Qwen2 always has qkv bias (model_config sets attention_bias)"
        super().__init__(cfg, ops)
