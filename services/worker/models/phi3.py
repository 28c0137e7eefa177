"""Phi-3 / Phi-3.5 / Phi-4 (Phi3ForCausalLM): the Llama architecture whose checkpoint already
stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, in the layouts of our fused
parameters ([q; k; v] rows, [gate; up] rows): the loader copies them whole (no stacked shards).
Long-context checkpoints use LongRoPE (`rope_scaling.type` "longrope" / "su", short and long
factors; kernels/reference.build_rope_cache); Phi-3-mini-4k slides a window of 2047.
Phi-4-mini's partial rotary embedding is not supported (model_config says so)."""

from __future__ import annotations

from services.worker.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    stacked_params = ()
