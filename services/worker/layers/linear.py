"""nn.Linear whose forward goes through the kernel bundle's `linear` when it has one.

Same parameters and names as nn.Linear (the loader and checkpoints see no difference). On the
CPU (reference bundle, `linear` is None) it is exactly nn.Linear; on CUDA the Triton bundle sends
decode-sized inputs to a skinny-GEMM kernel for the shapes where it measured faster than cuBLAS
(kernels/triton/skinny_gemm.py), everything else to F.linear.

With the model's norms folded (models/llama.py `fold_norms`), the projections that consume the
raw residual stream or add into it go through `linear_rms_norm` and `linear_add` instead.

A quantized layer holds a `QuantMethod` (layers/quantization/): it owns the layer's weight
parameters (in place of `weight`), their loading and the GEMM. A quantized model folds its norms
too, but into the GEMM rather than the weights (its codes stay the checkpoint's): the folded-norm
methods below take the norm's weight and run `KernelOps.quant_linear_fused`, which multiplies x's
columns by it and applies the 1/rms, the SiLU-and-mul or the residual add in the same launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.lora import LoRAProjection
from services.worker.parallel import all_reduce, current

if TYPE_CHECKING:
    from services.worker.checkpoint import CheckpointTensor
    from services.worker.layers.split import Split


# Rows up to which an unfolded quantized gate/up runs SiLU-and-mul in its GEMM's epilogue: the
# decode buckets the fused variants are tuned at (kernels/triton/quant_gemm.py FUSED_ROWS).
QUANT_GATED_MAX_ROWS = 16


@dataclass(frozen=True)
class QuantOperands:
    """What a quantized layer passes `KernelOps.quant_linear` (the integer-weight GEMM); the
    tuner times that GEMM on them (kernels/triton/quant_gemm.py `tune_quant_linear`)."""

    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, K // 2]
    scales: torch.Tensor  # [N, G] fp32
    zeros: torch.Tensor | None  # [N, G] fp32
    bits: int


class QuantMethod(Protocol):
    """What a `Linear` needs of its weight format (layers/quantization/base.py implements it; a
    protocol here so that the layer and the formats do not import each other)."""

    name: str
    checkpoint_suffixes: tuple[str, ...]

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None: ...
    def read_part(self, suffix: str, source: CheckpointTensor, split: Split | None) -> torch.Tensor: ...
    def create_weights(self, layer: Linear) -> None: ...
    def load_weight(self, layer: Linear, weight: torch.Tensor, row_start: int) -> None: ...
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def dequantized_weight(self, layer: Linear) -> torch.Tensor: ...
    def gemm_operands(self, layer: Linear) -> QuantOperands | None: ...
    def fused_operands(self, layer: Linear) -> QuantOperands | None: ...


class Linear(nn.Linear):
    # A quantized layer's parameters in place of `weight` (set by its QuantMethod's create_weights)
    qweight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor  # packed checkpoint formats with zero points
    input_perm: torch.Tensor  # GPTQ act-order: x's columns in group order
    # Row-parallel layers split their input columns over `tp_size` ranks (quantization/base.py
    # then takes a row's scale over all of them)
    splits_input = False
    tp_size = 1

    def __init__(self, ops: KernelOps, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops
        self.quant_method: QuantMethod | None = None
        # Multi-LoRA (services/worker/lora/pool.py): each row's adapter added to the output
        self.lora: LoRAProjection | None = None
        # The RMSNorm weight folded into this weight (models/llama.py fold_norms), kept because an
        # adapter's A must carry it too (lora/pool.py); None when no norm was folded here.
        self.folded_norm: torch.Tensor | None = None

    def set_quant_method(self, method: QuantMethod) -> None:
        """Store this layer's weight in `method`'s format (before the weights are loaded)."""
        self.quant_method = method
        method.create_weights(self)

    def forward(self, x: torch.Tensor, early_signal: bool = False) -> torch.Tensor:  # [T, in] -> [T, out]
        """early_signal: the next kernel is a short latency-bound one that may launch (and do its
        pre-wait loads) while this projection streams its weight (kernels/triton/pdl.py)."""
        t = self._lora_shrink(x)
        if t is not None:  # (the LoRA expand comes next, not the kernel the signal is for)
            early_signal = False
        return self._lora_expand(self._base_forward(x, early_signal), t)

    @property
    def lora_active(self) -> bool:
        """Whether this forward adds adapters here: LoRA is on and some row of the step has an
        adapter (a step of base rows only launches no LoRA kernel: layers/lora.py)."""
        return self.lora is not None and self.lora.mapping.active

    def _lora_shrink(self, x: torch.Tensor) -> torch.Tensor | None:
        """The step's adapters' x @ A^T (None when no row has one), issued before the base
        projection: in a captured graph it runs beside the GEMM (layers/lora.py)."""
        return self.lora.shrink(x) if self.lora is not None and self.lora.mapping.active else None

    def _lora_expand(self, out: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """out [T, out] += t @ B^T for the rows of an adapter (`_lora_shrink`'s t)."""
        if t is not None:
            assert self.lora is not None
            self.lora.expand(out, t)
        return out

    def _base_forward(self, x: torch.Tensor, early_signal: bool) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        if self.ops.linear is None:
            return super().forward(x)
        return self.ops.linear(x, self.weight, self.bias, early_signal=early_signal)

    def linear_rms_norm(
        self, x: torch.Tensor, eps: float, norm_weight: torch.Tensor | None = None
    ) -> torch.Tensor:  # [T, in] -> [T, out]
        """This projection of the RMS-normalised x: the norm's weight folded into this weight, or
        (a quantized layer) `norm_weight` applied to x inside the GEMM."""
        # (an adapter's A reads the normalised input, which this op never materialises)
        assert not self.lora_active, "with adapter rows, the norm runs first (models/llama.py)"
        if self.quant_method is not None:
            return self._quant_fused(x, self.bias, norm_weight=norm_weight, rms_eps=eps)
        assert self.ops.linear_rms_norm is not None, f"kernel bundle {self.ops.name!r} has no linear_rms_norm"
        return self.ops.linear_rms_norm(x, self.weight, self.bias, eps)

    def linear_norm_weight(
        self, x: torch.Tensor, norm_weight: torch.Tensor | None, early_signal: bool = False
    ) -> torch.Tensor:  # [T, in] -> [T, out]
        """This projection of x * norm_weight (per input column) for a folded norm whose 1/rms a
        later kernel applies (decode attention): a quantized layer multiplies inside its GEMM; a
        full-precision one has the norm weight in its weight already (norm_weight None)."""
        if self.quant_method is not None:
            # an adapter's A is not scaled by the norm weight here (no weight carries it): it reads
            # x * norm_weight, materialised only for a step with adapter rows
            t = None
            if self.lora_active:
                t = self._lora_shrink(x if norm_weight is None else x * norm_weight)
                early_signal = False  # (the LoRA expand comes next)
            out = self._quant_fused(x, self.bias, norm_weight=norm_weight, early_signal=early_signal)
            return self._lora_expand(out, t)
        assert norm_weight is None, "a full-precision layer's folded norm weight is in its weight"
        return self(x, early_signal=early_signal)

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        """residual + this projection of x, in one op (residual [T, out] is not written), then
        the rows' adapters (added to the sum: the same as to the projection)."""
        t = self._lora_shrink(x)
        if self.quant_method is not None:
            return self._lora_expand(self._quant_fused(x, self.bias, residual=residual), t)
        assert self.ops.linear_add is not None, f"kernel bundle {self.ops.name!r} has no linear_add"
        return self._lora_expand(self.ops.linear_add(x, self.weight, self.bias, residual), t)

    def linear_silu_and_mul(
        self, x: torch.Tensor, rms_eps: float | None = None, norm_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """silu(gate) * up of this fused [gate; up] projection of x: [T, in] -> [T, out / 2]; with
        rms_eps, x is the raw residual stream and gate/up are scaled by its 1/rms (folded norm; a
        quantized layer also takes the norm's weight, `norm_weight`)."""
        assert not self.lora_active, "an adapter adds to gate / up before the activation"
        if self.quant_method is not None and rms_eps is None:
            # decode-sized (the buckets the fused variants are tuned at): SiLU-and-mul in the
            # quantized GEMM's epilogue where the format has the fused GEMM
            if x.shape[0] <= QUANT_GATED_MAX_ROWS and self.quant_method.fused_operands(self) is not None:
                return self._quant_fused(x, self.bias, gated=True)
            return self.ops.silu_and_mul(self.quant_method.apply(self, x, self.bias))
        if self.quant_method is not None:
            return self._quant_fused(x, self.bias, norm_weight=norm_weight, rms_eps=rms_eps, gated=True)
        assert self.ops.linear_silu_and_mul is not None, (
            f"kernel bundle {self.ops.name!r} has no linear_silu_and_mul"
        )
        return self.ops.linear_silu_and_mul(x, self.weight, self.bias, rms_eps)

    def _quant_fused(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        norm_weight: torch.Tensor | None = None,
        rms_eps: float | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        early_signal: bool = False,
    ) -> torch.Tensor:
        """A quantized layer's folded-norm GEMM (`KernelOps.quant_linear_fused`)."""
        assert self.quant_method is not None  # (each caller adds its adapters' deltas)
        operands = self.quant_method.fused_operands(self)
        assert operands is not None, f"{self.quant_method.name} weights have no fused GEMM (norms not folded)"
        return self.ops.quant_linear_fused(
            x,
            operands.qweight,
            operands.scales,
            operands.bits,
            operands.zeros,
            bias,
            norm_weight=norm_weight,
            rms_eps=rms_eps,
            gated=gated,
            residual=residual,
            early_signal=early_signal,
        )


class RowParallelLinear(Linear):
    """A projection whose input columns are split over the tensor-parallel ranks (o_proj,
    down_proj): each rank multiplies its slice, ONE all-reduce sums the partial products, and the
    bias (replicated) is added once, after it. With T = 1 it is exactly `Linear`.

    A LoRA adapter's delta is added to this rank's partial product before the all-reduce (its A
    holds the rank's input columns, its B is whole: services/worker/lora/adapter.py), so the sum
    carries it and the layer keeps its one all-reduce."""

    splits_input = True

    def __init__(self, ops: KernelOps, in_features: int, out_features: int, bias: bool, tp_size: int) -> None:
        super().__init__(ops, in_features, out_features, bias)
        self.tp_size = tp_size

    def forward(self, x: torch.Tensor, early_signal: bool = False) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x, early_signal)
        t = self._lora_shrink(x)
        if self.quant_method is not None:  # (its input columns: quantization/base.py)
            out = self.quant_method.apply(self, x, None)
        elif self.ops.linear is None:
            out = torch.nn.functional.linear(x, self.weight)
        else:
            out = self.ops.linear(x, self.weight, None, early_signal=False)
        self._lora_expand(out, t)
        all_reduce(out)
        return out if self.bias is None else out + self.bias

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + this projection of x (folded norms). The residual stream is whole and the
        same on every rank, so only tensor-parallel rank 0 adds it to its partial product; the
        other ranks add nothing, and the one all-reduce sums T partial products and ONE residual
        (the bias, replicated, once after it, as in `forward`)."""
        if self.tp_size == 1:
            return super().linear_add(x, residual)
        assert self.ops.linear_add is not None, f"kernel bundle {self.ops.name!r} has no linear_add"
        t = self._lora_shrink(x)
        if self.quant_method is not None:  # (its input columns: quantization/base.py)
            if current().tp_rank == 0:
                out = self._quant_fused(x, None, residual=residual)
            else:
                out = self.quant_method.apply(self, x, None)
        elif current().tp_rank == 0:
            out = self.ops.linear_add(x, self.weight, None, residual)
        elif self.ops.linear is None:
            out = torch.nn.functional.linear(x, self.weight)
        else:
            out = self.ops.linear(x, self.weight, None, early_signal=False)
        self._lora_expand(out, t)  # (this rank's partial delta, summed by the all-reduce)
        all_reduce(out)
        return out if self.bias is None else out + self.bias
