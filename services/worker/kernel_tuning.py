"""Kernel configs measured at engine start (CUDA): for each projection shape and row bucket, the
config each GEMM-like kernel runs, chosen by timing its candidates (checked against the reference
twin first) in CUDA graphs:

- bf16 projections: the skinny Triton GEMM against cuBLAS, with the gated (SiLU / GELU) and
  residual variants (kernels/triton/skinny_gemm.py `tune_linear`);
- FP8 W8A8 projections: `torch._scaled_mm`, the Triton FP8 GEMM or the weight-only GEMM
  (kernels/triton/fp8_gemm.py);
- integer (and FP8 weight-only) projections: the quantized GEMM's tile configs and its fused decode
  variants (kernels/triton/quant_gemm.py);
- mixtures of experts: the decode GEMVs' tiles per expert shape (kernels/triton/moe_tune.py);
- decode attention, only with `--tune-decode-attention`: the paged decode kernel's tile / split
  config per attention shape and decode batch bucket (kernels/triton/decode_attention_tune.py);
  off by default, for its start-up cost (a compile per candidate and shape) against a gain of a few
  percent of the attention where it was measured (docs/gpu.md).

The choices live in each kernel module (process-wide); the report lines go to the log and to
`ModelRunner.linear_report`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels import KernelOps
from kernels.ops import AttentionShape
from services.worker.layers.linear import Linear
from services.worker.layers.moe import MoeLayer, MoeOperands
from services.worker.layers.quantization.fp8 import Fp8Method, runs_w8a8
from services.worker.models.llama import Attention, LlamaForCausalLM, quant_fusions

log = logging.getLogger(__name__)


def tune_kernels(
    model: LlamaForCausalLM,
    ops: KernelOps,
    device: torch.device,
    dtype: torch.dtype,
    max_rows: int,
    decode_attention: bool = False,
) -> list[str]:
    """Every GEMM-like kernel's config, measured per shape at engine start (CUDA): the bf16
    projections' skinny GEMM against cuBLAS, FP8, the quantized GEMM and its fused decode variants,
    the decode MoE kernels, and with `decode_attention` (`--tune-decode-attention`) the decode
    attention kernel's launch config. `max_rows`: the largest row count the bf16 skinny GEMM is
    tuned for (the decode graphs that run the LM head). Returns the report lines (also logged)."""
    if ops.tune_linear is None:
        return []
    # Each projection of every layer by name (qkv_proj, o_proj, gate_up_proj, down_proj), then the LM head.
    groups: dict[str, list[nn.Linear]] = {}
    # (an MoE router's decode GEMV runs inside the routing kernel, ops.moe_router: not a GEMM)
    routers = {id(m.router_linear()) for m in model.model.layers.modules() if isinstance(m, MoeLayer)}
    for name, module in model.model.layers.named_modules():
        # quantized projections run their own GEMM (layers/quantization/), nothing to tune
        plain = isinstance(module, nn.Linear) and getattr(module, "quant_method", None) is None
        if plain and id(module) not in routers:
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    # (a later pipeline stage has no LM head: models/llama.py OnFirstStage)
    if model.layout.first_stage and getattr(model.lm_head, "quant_method", None) is None:
        groups["lm_head"] = [model.lm_head]
    report: list[str] = []
    with torch.inference_mode():
        report += _tune_fp8_linears(model, ops, device, dtype)
        report += _tune_quant_linears(model, ops)
        report += _tune_moe(model, ops)
        if decode_attention:
            report += _tune_decode_attention(model, ops, device, dtype)
        for name, mods in groups.items():
            shapes = {tuple(m.weight.shape) for m in mods}
            assert len(shapes) == 1, (name, shapes)
            # gate_up_proj is the models' fused [gate; up] projection (the activation-and-mul
            # follows it: SiLU, or the model's `mlp_activation`, Gemma's GELU)
            report += ops.tune_linear(
                [m.weight for m in mods],
                mods[0].bias,
                max_rows,
                name,
                gated=name == "gate_up_proj",
                activation=getattr(model, "mlp_activation", "silu"),
            )
    torch.cuda.empty_cache()
    for line in report:
        log.info("%s", line)
    return report


def _tune_fp8_linears(
    model: LlamaForCausalLM, ops: KernelOps, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """W8A8 FP8 projections (layers/quantization/fp8.py): `_scaled_mm` against the Triton FP8
    GEMM per shape and row bucket (kernels/triton/fp8_gemm.py), by projection name."""
    if ops.tune_fp8_linear is None:
        return []
    groups: dict[str, list[Linear]] = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, Linear)
            and isinstance(module.quant_method, Fp8Method)
            and runs_w8a8(module.qweight, device, dtype)
        ):
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    report: list[str] = []
    for name, mods in groups.items():
        for shape in sorted({tuple(m.qweight.shape) for m in mods}):
            same = [m for m in mods if tuple(m.qweight.shape) == shape]
            # a row-parallel layer over T > 1 ranks adds its bias after the all-reduce
            bias = None if same[0].splits_input and same[0].tp_size > 1 else same[0].bias
            report += ops.tune_fp8_linear(
                [m.qweight for m in same], [m.weight_scale for m in same], bias, name
            )
    return report


def _tune_moe(model: LlamaForCausalLM, ops: KernelOps) -> list[str]:
    """The decode MoE kernels' tile configs for each expert shape (kernels/triton/moe_tune.py)."""
    if ops.tune_moe is None:
        return []
    groups: dict[tuple[object, ...], list[MoeOperands]] = {}
    for module in model.modules():
        if isinstance(module, MoeLayer):
            o = module.operands()
            key = (
                tuple(o.w13.shape),
                o.top_k,
                o.activation,
                o.w13_bias is not None,
                o.w2_bias is not None,
            )
            groups.setdefault(key, []).append(o)
    report: list[str] = []
    for layers in groups.values():
        first = layers[0]
        report += ops.tune_moe(
            [o.w13 for o in layers],
            [o.w2 for o in layers],
            [o.w13_bias for o in layers if o.w13_bias is not None] or None,
            [o.w2_bias for o in layers if o.w2_bias is not None] or None,
            first.top_k,
            first.activation,
        )
    return report


def _tune_decode_attention(
    model: LlamaForCausalLM, ops: KernelOps, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """The decode attention kernel's config for each distinct attention shape of the model (local
    and global layers apart), at the decode batches that run rotary + KV write in it."""
    if ops.tune_decode_attention is None:
        return []
    shapes: list[AttentionShape] = []
    for module in model.modules():
        if isinstance(module, Attention):
            attn = module.attn
            # a folded input norm's 1/rms is computed in the kernel (models/llama.py forward_folded)
            rms_hidden = module.qkv_proj.in_features if model.norms_folded else 0
            shapes.append(
                AttentionShape(
                    attn.num_heads,
                    attn.num_kv_heads,
                    attn.head_dim,
                    int(attn.masks.get("sliding_window", 0)),
                    attn.masks.get("soft_cap", 0.0),
                    attn.sinks is not None,
                    rms_hidden,
                )
            )
    if not shapes or not ops.graph_capturable(shapes[0].head_dim):
        return []
    return ops.tune_decode_attention(list(dict.fromkeys(shapes)), dtype, device)


def _tune_quant_linears(model: LlamaForCausalLM, ops: KernelOps) -> list[str]:
    """Integer-weight projections (int8 / int4 at load, AWQ / GPTQ / compressed-tensors): the
    quantized GEMM's tile configs per shape and row bucket (kernels/triton/quant_gemm.py); in a
    model, also each projection's fused decode variants (`quant_fusions`: the folded norms'
    or, unfolded, gate/up's SiLU-and-mul) at the decode buckets, FP8 weights included."""
    return _tune_quant_groups(model, ops, fused=False) + _tune_quant_groups(model, ops, fused=True)


def _tune_quant_groups(model: LlamaForCausalLM, ops: KernelOps, fused: bool) -> list[str]:
    if ops.tune_quant_linear is None:
        return []
    groups: dict[tuple[str, tuple[int, ...], int, int, bool], list[Linear]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.quant_method is None:
            continue
        short = name.rsplit(".", 1)[-1]
        if fused and not quant_fusions(short, model.norms_folded):
            continue
        operand = (module.quant_method.fused_operands if fused else module.quant_method.gemm_operands)(module)
        if operand is not None:
            key = (
                name.rsplit(".", 1)[-1],
                tuple(operand.qweight.shape),
                operand.bits,
                operand.scales.shape[1],
                operand.zeros is not None,
            )
            groups.setdefault(key, []).append(module)
    report: list[str] = []
    for (name, _, bits, _, _), mods in sorted(groups.items(), key=lambda item: item[0][:2]):
        operands = [
            (m.quant_method.fused_operands if fused else m.quant_method.gemm_operands)(m)
            for m in mods
            if m.quant_method is not None
        ]
        first = mods[0]
        # a row-parallel layer over T > 1 ranks adds its bias after the all-reduce
        bias = None if first.splits_input and first.tp_size > 1 else first.bias
        for fusion in quant_fusions(name, model.norms_folded) if fused else [None]:
            report += ops.tune_quant_linear(
                [o.qweight for o in operands if o is not None],
                [o.scales for o in operands if o is not None],
                [o.zeros for o in operands if o is not None and o.zeros is not None] or None,
                bits,
                bias,
                name,
                fusion=fusion,
            )
    return report
