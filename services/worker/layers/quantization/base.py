"""`QuantMethod`: how one format stores, loads and multiplies a `Linear`'s weight.

A `Linear` holds one (None: the plain bf16 / fp32 nn.Linear path, unchanged). The method
replaces the layer's `weight` parameter with its own (e.g. int8 `qweight` + fp32 `weight_scale`)
while the model is still on the meta device, takes each checkpoint tensor as it streams in
(`load_weight`: quantize those rows into place, so no full-precision copy of the layer is kept)
and runs the layer's GEMM (`apply`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.worker.layers.linear import Linear


class QuantMethod:
    name = "none"
    # The checkpoint tensors of one projection (`<module>.<suffix>`) this format reads
    checkpoint_suffixes: tuple[str, ...] = ("weight",)

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        """All of one projection's checkpoint tensors (by suffix), for output rows
        [row_start, row_start + rows) of the layer; ValueError for a wrong shape or content.
        By default: a full-precision `weight`, quantized by `load_weight`."""
        weight = parts["weight"]
        if tuple(weight.shape) != (rows, layer.in_features):
            raise ValueError(f"shape {tuple(weight.shape)}, expected {(rows, layer.in_features)}")
        self.load_weight(layer, weight, row_start)

    def create_weights(self, layer: Linear) -> None:
        """Replace `layer.weight` by this format's parameters (called on the meta device)."""
        raise NotImplementedError

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_start: int) -> None:
        """Quantize a full-precision checkpoint tensor [rows, in_features] into rows
        [row_start, row_start + rows) of the layer (a shard of a fused qkv / gate_up, or all of it)."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype, bias included."""
        raise NotImplementedError

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        """The fp32 [out, in] weight this layer multiplies by (tests and tools)."""
        raise NotImplementedError


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter of the model (quantized ones at their stored size; a tied
    embedding / LM head counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.parameters():
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
