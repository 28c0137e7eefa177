"""gpt-oss (GptOssForCausalLM: openai/gpt-oss-20b, -120b): Llama-style attention and a sparse
mixture of experts in every layer, with

- attention sinks: a learned logit per query head in every softmax's denominator
  (`self_attn.sinks`, PagedAttention(sinks=True); the kernels add exp(sink) to the normaliser);
- biases on q, k, v and o (`attention_bias`), sliding-window (128) and full layers alternating
  (`layer_types`; the first layer slides), YaRN rope (x32 over 4096 positions);
- its router: top-k of the router's logits (a Linear with bias), softmax over the chosen ones;
- its experts: biased gate/up and down projections and a clamped SwiGLU
  ((clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = clamp(gate, max=7): reference.swiglu_oai),
  run by `ops.fused_moe` (activation "swiglu_oai").

Checkpoint layout (transformers' GptOssExperts): `mlp.experts.gate_up_proj` [E, H, 2I] with the
gate and up columns interleaved, `down_proj` [E, I, H], biases `gate_up_proj_bias` [E, 2I]
(interleaved too) and `down_proj_bias` [E, H]. As shipped the two weights are MXFP4
(`*_blocks` / `*_scales`, [E, out, in]); `remap_checkpoint` dequantizes them (and transposes the
full-precision ones) into the [E, out, in] stacked layout with [gate; up] halves that
`fused_moe` reads. Tensor parallelism slices every expert's intermediate dimension; the down
bias is added by rank 0 only (the outputs are summed over ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.linear import Linear
from services.worker.layers.moe import MoeLayer, MoeOperands, route
from services.worker.layers.quantization.mxfp4 import dequantize_mxfp4
from services.worker.model_config import ModelConfig
from services.worker.models.llama import DecoderLayer, LlamaForCausalLM
from services.worker.parallel import ShardLayout, all_reduce

if TYPE_CHECKING:
    from services.worker.checkpoint import CheckpointTensor

_EXPERTS = ".mlp.experts."


class GptOssExperts(nn.Module):
    """Every expert's weights, stacked: gate_up_proj [E, 2*I, H] ([gate; up] rows), down_proj
    [E, H, I], and their biases (this rank's slice of I under tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, layout: ShardLayout) -> None:
        super().__init__()
        inter, experts, hidden = layout.moe_intermediate_size, cfg.num_experts, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))


class GptOssMoeBlock(MoeLayer):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layout: ShardLayout) -> None:
        super().__init__()
        self.ops = ops
        self.top_k = cfg.num_experts_per_tok
        self.tp_size, self.tp_rank = layout.tp_size, layout.tp_rank
        self.router = Linear(ops, cfg.hidden_size, cfg.num_experts, bias=True)  # replicated
        self.experts = GptOssExperts(cfg, layout)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]): softmax over the top-k router logits."""
        return route(self.ops, self.router, x, self.top_k, "topk_softmax")

    def router_linear(self) -> Linear:
        return self.router

    def operands(self) -> MoeOperands:
        e = self.experts
        down_bias = e.down_proj_bias if self.tp_rank == 0 else None  # once in the all-reduce's sum
        return MoeOperands(
            e.gate_up_proj, e.down_proj, e.gate_up_proj_bias, down_bias, self.top_k, "swiglu_oai"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden] normed
        weights, ids = self.route(x)
        o = self.operands()
        out = self.ops.fused_moe(x, o.w13, o.w2, weights, ids, o.w13_bias, o.w2_bias, o.activation)
        return all_reduce(out) if self.tp_size > 1 else out


class GptOssForCausalLM(LlamaForCausalLM):
    # the sinks live in the attention op (PagedAttention), one module below HF's attention
    checkpoint_renames = ((".self_attn.sinks", ".self_attn.attn.sinks"),)

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        assert cfg.num_experts > 0 and cfg.attention_sinks, "model_config reads gpt-oss's experts and sinks"
        super().__init__(cfg, ops)
        for layer in self.model.layers:
            if isinstance(layer, DecoderLayer):  # (not another pipeline stage's MissingLayer)
                layer.mlp = GptOssMoeBlock(cfg, ops, self.layout)  # type: ignore[assignment]

    def remap_checkpoint(
        self, tensors: Iterator[tuple[str, str, CheckpointTensor]]
    ) -> Iterator[tuple[str, str, CheckpointTensor]]:
        """The experts' tensors in our layout (module docstring); MXFP4 pairs dequantized once both
        halves have been read; every other tensor unchanged."""
        from services.worker.checkpoint import CheckpointTensor, WeightLoadError

        pending: dict[str, dict[str, torch.Tensor]] = {}  # "<experts prefix><proj>" -> blocks / scales
        dtype = self.model.weight_dtype
        for file_name, name, tensor in tensors:
            prefix, sep, local = name.partition(_EXPERTS)
            if not sep:
                yield file_name, name, tensor
                continue
            proj, _, part = local.partition("_proj")
            if part in ("_blocks", "_scales"):
                parts = pending.setdefault(f"{prefix}{_EXPERTS}{proj}", {})
                parts[part] = tensor.read(0, 0, tensor.shape[0])
                if len(parts) < 2:
                    continue
                del pending[f"{prefix}{_EXPERTS}{proj}"]
                try:
                    weight = dequantize_mxfp4(parts["_blocks"], parts["_scales"], dtype)  # [E, out, in]
                except ValueError as exc:
                    raise WeightLoadError(f"{file_name}: {prefix}{_EXPERTS}{proj}_proj: {exc}") from None
            elif part == "":  # full precision, transformers' [E, in, out]
                weight = tensor.read(0, 0, tensor.shape[0]).transpose(1, 2)
            elif part == "_bias":
                weight = tensor.read(0, 0, tensor.shape[0])
            else:
                yield file_name, name, tensor  # unknown: the loader names it
                continue
            target = f"{prefix}{_EXPERTS}{proj}_proj{'_bias' if part == '_bias' else ''}"
            yield file_name, target, CheckpointTensor.of(self._expert_layout(proj, part, weight))
        for key, parts in pending.items():
            missing = "_scales" if "_blocks" in parts else "_blocks"
            raise WeightLoadError(f"{self.config.path}: missing tensor {key}_proj{missing}")

    def _expert_layout(self, proj: str, part: str, weight: torch.Tensor) -> torch.Tensor:
        """gate_up [E, 2I(, H)] interleaved -> [gate; up] halves of this rank's slice of I;
        down [E, H, I] -> this rank's columns (its bias whole)."""
        inter, rank = self.layout.moe_intermediate_size, self.layout.tp_rank
        if proj == "gate_up":
            gate, up = weight[:, 0::2], weight[:, 1::2]
            rows = slice(rank * inter, (rank + 1) * inter)
            return torch.cat((gate[:, rows], up[:, rows]), dim=1).contiguous()
        if part == "_bias":
            return weight
        return weight[:, :, rank * inter : (rank + 1) * inter].contiguous()
