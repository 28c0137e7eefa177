"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm) with a sparse mixture-of-experts
feed-forward in every layer but `mlp_only_layers` / off-`decoder_sparse_step` ones; top-k of the
router's softmax, renormalised when `norm_topk_prob` (layers/moe.py). Its layer norms stay
unfolded, as dense Qwen3's do (`folds_with_qk_norm`; docs/worker.md "MoE decode (issue 22)")."""

from __future__ import annotations

from kernels import KernelOps
from services.worker.model_config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    # The folded path exists (the input norm's weight into qkv, the post-attention norm into the
    # router and the experts, 1/rms in the routing and gate/up kernels: layers/moe.py) but is off:
    # on the GPU its bf16 rounding (W * g rounded once) put the engine's greedy agreement with
    # transformers fp32 under the bar of tests/kernels/test_engine_gpu.py, as dense Qwen3's fold
    # did (docs/worker.md "MoE decode (issue 22)").
    folds_with_qk_norm = False

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.num_experts > 0, "Qwen3MoeForCausalLM needs num_experts (model_config reads it)"
        super().__init__(cfg, ops)
