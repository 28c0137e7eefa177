"""Mixtral: Llama attention with a sparse mixture-of-experts feed-forward in every layer (top-2 of
8 experts in Mixtral-8x7B; softmax over the chosen logits). The checkpoint calls the block
`block_sparse_moe` and an expert's projections w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.num_experts > 0, "MixtralForCausalLM needs num_experts (model_config reads it)"
        super().__init__(cfg, ops)
