"""`--quantization int4`: weight-only 4-bit (W4A16), symmetric, one fp32 scale per group of 128
input columns (or --quantization-group-size), quantized at load time.

The layout is the one AWQ / GPTQ checkpoints are repacked to (kernels/reference.py
`dequantize_weight`, bits=4): two values a byte along K, even k in the low nibble, stored as
q + 8 in [0, 15]. It gives W4A16's decode speed on a full-precision checkpoint, at 4-bit round-to-
nearest accuracy (no AWQ / GPTQ calibration: for quality, serve a calibrated checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.reference import dequantize_weight
from services.worker.layers.linear import Linear
from services.worker.layers.quantization.base import QuantMethod, QuantOperands

DEFAULT_GROUP_SIZE = 128


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, K // 2] packed, fp32 scales [N, K // group_size]) of a [N, K] weight (K even)."""
    w = weight.float()
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    scales = grouped.abs().amax(dim=-1).clamp(min=1e-8) / 7.0
    q = (torch.round(grouped / scales[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales


class Int4Method(QuantMethod):
    name = "int4"

    def __init__(self, group_size: int = 0) -> None:
        self.group_size = group_size or DEFAULT_GROUP_SIZE

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        if k % self.group_size or k % 2:
            raise ValueError(
                f"--quantization int4: group size {self.group_size} does not divide in_features {k}"
            )
        device = layer.weight.device
        del layer.weight
        layer.qweight = nn.Parameter(
            torch.empty(n, k // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(
            torch.empty(n, k // self.group_size, dtype=torch.float32, device=device), requires_grad=False
        )

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_start: int) -> None:
        rows = weight.shape[0]
        q, scales = quantize_int4(weight.to(layer.qweight.device), self.group_size)
        layer.qweight.data[row_start : row_start + rows].copy_(q)
        layer.weight_scale.data[row_start : row_start + rows].copy_(scales)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.ops.quant_linear(x, layer.qweight, layer.weight_scale, 4, None, bias)

    def gemm_operands(self, layer: Linear) -> QuantOperands | None:
        return QuantOperands(layer.qweight, layer.weight_scale, None, 4)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        return dequantize_weight(layer.qweight, layer.weight_scale, 4)
