"""`--quantization fp8`: float8 e4m3 weights with one fp32 scale per output channel.

On a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper) the GEMM is W8A8: each
row of the activations gets its own scale (max |x| / 448, computed per call: dynamic per-token)
and the two FP8 operands are multiplied with the row and column scales applied in the epilogue,
by the kernel bundle's `fp8_linear` (Triton bundle: a Triton FP8 GEMM or `torch._scaled_mm`,
whichever `tune_fp8_linear` measured faster for the shape and row count, kernels/triton/fp8_gemm.py)
or, without one, `torch._scaled_mm` (`scaled_mm_fp8`). The twin is `reference.fp8_w8a8_linear`.
Elsewhere (CPU, Ampere), in fp16 / fp32 and for shapes `_scaled_mm` refuses (K or N not a multiple
of 16) it is weight-only: the weight is dequantized and multiplied in fp32 (`reference.fp8_linear`).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import reference
from services.worker.layers.linear import Linear
from services.worker.layers.quantization.base import QuantMethod, QuantOperands, row_absmax

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_fp8(weight: torch.Tensor, layer: Linear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [N, K], fp32 scales [N, 1]) of a [N, K] weight, one scale per row (over the
    whole row of `layer` when it is row-parallel: base.row_absmax)."""
    w = weight.float()
    absmax = w.abs().amax(dim=-1, keepdim=True)
    if layer is not None:
        absmax = row_absmax(layer, absmax)
    scales = absmax.clamp(min=1e-12) / FP8_MAX
    return (w / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def device_has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def runs_w8a8(weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an e4m3 weight [N, K] multiplies activations of `dtype` on `device` as W8A8 (else
    weight-only): an FP8 GPU, bf16, N and K multiples of 16 (`_scaled_mm`'s shapes)."""
    n, k = weight.shape
    return device_has_fp8(device) and dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0


def scaled_mm_fp8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x quantized per token (dynamic scales, `reference.quantize_per_token_fp8`) to e4m3,
    then `torch._scaled_mm` with row-wise scales, out in x's dtype."""
    xq, x_scale = reference.quantize_per_token_fp8(x)  # [M, K] e4m3, [M, 1]
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1), out_dtype=x.dtype
    )
    return out if bias is None else out + bias


class Fp8Method(QuantMethod):
    name = "fp8"

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        device = layer.weight.device
        del layer.weight
        layer.qweight = nn.Parameter(torch.empty(n, k, dtype=FP8, device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(
            torch.empty(n, 1, dtype=torch.float32, device=device), requires_grad=False
        )

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_start: int) -> None:
        rows = weight.shape[0]
        q, scales = quantize_fp8(weight.to(layer.qweight.device), layer)
        layer.qweight.data[row_start : row_start + rows].copy_(q)
        layer.weight_scale.data[row_start : row_start + rows].copy_(scales)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w, s = layer.qweight, layer.weight_scale
        if runs_w8a8(w, x.device, x.dtype):
            return (layer.ops.fp8_linear or scaled_mm_fp8)(x, w, s, bias)
        return reference.fp8_linear(x, w, s, bias)

    def fused_operands(self, layer: Linear) -> QuantOperands | None:
        """The folded-norm decode path runs FP8 weights weight-only (e4m3 codes against the
        activations as they are: quant_gemm.py `fp8_weight_only`), the choice the FP8 tuner made
        for every decode bucket of the Llama-3.1-8B shapes (docs/quantization.md). Not on a GPU
        without FP8 (Triton converts e4m3 from compute capability 8.9): the norms stay unfolded
        there, the projections on the weight-only twin as before."""
        device = layer.qweight.device
        if device.type == "cuda" and not device_has_fp8(device):
            return None
        return QuantOperands(layer.qweight, layer.weight_scale, None, 8)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        return layer.qweight.float() * layer.weight_scale.float()
