"""`--quantization int8`: weight-only INT8 (W8A16), quantized at load time.

Symmetric, per output channel (one fp32 scale per row: max |w| / 127) or, with a group size, per
group of `group_size` consecutive input columns of a row. Activations stay in the model dtype; the
GEMM dequantizes in registers (`KernelOps.quant_linear`: Triton on CUDA, the reference twin on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from services.worker.layers.linear import Linear
from services.worker.layers.quantization.base import QuantMethod, QuantOperands, row_absmax


def quantize_int8(
    weight: torch.Tensor, group_size: int, layer: Linear | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp32 scales [N, K // group_size]) of a [N, K] weight; group_size 0 = per
    channel (over the whole row of `layer` when it is row-parallel: base.row_absmax)."""
    w = weight.float()
    n, k = w.shape
    group = group_size or k
    grouped = w.reshape(n, k // group, group)
    absmax = grouped.abs().amax(dim=-1)
    if not group_size and layer is not None:
        absmax = row_absmax(layer, absmax)
    scales = absmax.clamp(min=1e-8) / 127.0
    q = torch.round(grouped / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales


class Int8Method(QuantMethod):
    name = "int8"

    def __init__(self, group_size: int = 0) -> None:
        self.group_size = group_size

    def _groups(self, layer: Linear) -> int:
        k = layer.in_features
        if self.group_size and k % self.group_size:
            raise ValueError(f"--quantization-group-size {self.group_size} does not divide in_features {k}")
        return k // self.group_size if self.group_size else 1

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        device = layer.weight.device
        del layer.weight
        layer.qweight = nn.Parameter(torch.empty(n, k, dtype=torch.int8, device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(
            torch.empty(n, self._groups(layer), dtype=torch.float32, device=device), requires_grad=False
        )

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_start: int) -> None:
        rows = weight.shape[0]
        q, scales = quantize_int8(weight.to(layer.qweight.device), self.group_size, layer)
        layer.qweight.data[row_start : row_start + rows].copy_(q)
        layer.weight_scale.data[row_start : row_start + rows].copy_(scales)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.ops.quant_linear(x, layer.qweight, layer.weight_scale, 8, None, bias)

    def gemm_operands(self, layer: Linear) -> QuantOperands | None:
        return QuantOperands(layer.qweight, layer.weight_scale, None, 8)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        from kernels.reference import dequantize_weight

        return dequantize_weight(layer.qweight, layer.weight_scale, 8)
