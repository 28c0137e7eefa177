"""`QuantMethod`: how one format stores, loads and multiplies a `Linear`'s weight.

A `Linear` holds one (None: the plain bf16 / fp32 nn.Linear path, unchanged). The method
replaces the layer's `weight` parameter with its own (e.g. int8 `qweight` + fp32 `weight_scale`)
while the model is still on the meta device, takes each checkpoint tensor as it streams in
(`load_weight`: quantize those rows into place, so no full-precision copy of the layer is kept)
and runs the layer's GEMM (`apply`).

Tensor parallelism: a rank holds its slice of each projection (a `Split`: output rows of a
column-parallel qkv / gate_up, input columns of a row-parallel o_proj / down) and reads only that
slice of each checkpoint tensor (`read_part`, laid out per format by `part_axes`). Quantizing at
load, a row-parallel rank's per-channel scale is the max over the WHOLE row (`row_absmax`: one
all-reduce), so every rank quantizes exactly as T = 1 does; per-group scales never straddle two
ranks (the group size must divide K / T: quantization/tensor_parallel.py refuses it at start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.worker import parallel
from services.worker.layers.linear import QuantOperands
from services.worker.layers.split import Split

if TYPE_CHECKING:
    from services.worker.checkpoint import CheckpointTensor
    from services.worker.layers.linear import Linear


def row_absmax(layer: Linear, absmax: torch.Tensor) -> torch.Tensor:
    """max |w| of each output row over the WHOLE row, from this rank's [rows, 1] maxima: a
    row-parallel layer split over T > 1 ranks holds only its slice of the row's columns, so the
    ranks take the max of their maxima (in place, one all-reduce at load)."""
    if layer.splits_input and layer.tp_size > 1:
        parallel.all_reduce_max(absmax)
    return absmax


class QuantMethod:
    name = "none"
    # The checkpoint tensors of one projection (`<module>.<suffix>`) this format reads
    checkpoint_suffixes: tuple[str, ...] = ("weight",)

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        """How checkpoint tensor `suffix` (of `shape`) follows a split of the weight along
        `split_dim`: (its dimension that runs along it, weight rows / columns per index along that
        dimension: a packing or group unit), or None when every rank reads it whole. By default a
        full-precision `weight` [N, K]."""
        return split_dim, 1

    def read_part(self, suffix: str, source: CheckpointTensor, split: Split | None) -> torch.Tensor:
        """This rank's slice of one checkpoint tensor (the whole tensor without a split); a
        ValueError when the split does not fall on the tensor's whole packed units or groups."""
        axes = None if split is None else self.part_axes(suffix, source.shape, split.dim)
        if split is None or axes is None:
            return source.read(0, 0, source.shape[0] if source.shape else 0)
        dim, unit = axes
        if split.start % unit or split.size % unit:
            raise ValueError(
                f"this rank's {split.describe()} do not fall on whole units of {unit} of {suffix} "
                f"(a packed word or a quantization group would straddle two ranks)"
            )
        return source.read(dim, split.start // unit, split.size // unit)

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

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype, plus `bias` (the layer's own, or None: a
        row-parallel layer adds it once, after its all-reduce)."""
        raise NotImplementedError

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        """The fp32 [out, in] weight this layer multiplies by (tests and tools)."""
        raise NotImplementedError

    def gemm_operands(self, layer: Linear) -> QuantOperands | None:
        """The operands of the layer's `quant_linear` call, or None when it runs another GEMM."""
        return None

    def fused_operands(self, layer: Linear) -> QuantOperands | None:
        """The operands of the layer's `quant_linear_fused` calls (the folded-norm decode path:
        models/llama.py `fold_norms`), or None when the format has no fused GEMM (the model then
        keeps its norms). By default those of `quant_linear`."""
        return self.gemm_operands(layer)


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
