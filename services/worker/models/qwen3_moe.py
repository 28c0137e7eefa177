"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm) with a sparse mixture-of-experts
feed-forward in every layer but `mlp_only_layers` / off-`decoder_sparse_step` ones; top-k of the
router's softmax, renormalised when `norm_topk_prob` (layers/moe.py). Decode steps run with the
layer norms folded (`folds_with_qk_norm`; docs/worker.md "MoE decode (issue 22)")."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    # Decode steps fold the layer norms (issue 22): the input norm's weight into qkv (its 1/rms
    # stays one norm launch: the q/k norms come between qkv and the attention kernel), the
    # post-attention norm into the router and the experts (no launch: layers/moe.py); o_proj and
    # the experts' down GEMV add the residual stream.
    folds_with_qk_norm = True

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.num_experts > 0, "Qwen3MoeForCausalLM needs num_experts (model_config reads it)"
        super().__init__(cfg, ops)
