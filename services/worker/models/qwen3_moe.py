"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm) with a sparse mixture-of-experts
feed-forward in every layer but `mlp_only_layers` / off-`decoder_sparse_step` ones; top-k of the
router's softmax, renormalised when `norm_topk_prob` (layers/moe.py)."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.num_experts > 0, "Qwen3MoeForCausalLM needs num_experts (model_config reads it)"
        super().__init__(cfg, ops)
