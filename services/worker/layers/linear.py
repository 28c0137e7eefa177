"""nn.Linear whose forward goes through the kernel bundle's `linear` when it has one.

Same parameters and names as nn.Linear (the loader and checkpoints see no difference). On the
CPU (reference bundle, `linear` is None) it is exactly nn.Linear; on CUDA the Triton bundle sends
decode-sized inputs to a skinny-GEMM kernel for the shapes where it measured faster than cuBLAS
(kernels/triton/skinny_gemm.py), everything else to F.linear. `silu_and_project` and
`norm_and_project` fold the op that feeds a projection (SiLU-and-mul, residual add + RMSNorm) into
that kernel where it measured faster, saving a launch per layer in a batch-1 decode step.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.attention import RMSNorm


class Linear(nn.Linear):
    def __init__(self, ops: KernelOps, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.ops.linear is None:
            return super().forward(x)
        return self.ops.linear(x, self.weight, self.bias)

    def silu_and_project(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * in] gate | up -> [T, out]
        """self(silu_and_mul(x)); one kernel where the bundle measured that faster (decode sizes)."""
        if self.ops.silu_mul_linear is not None:
            out = self.ops.silu_mul_linear(x, self.weight, self.bias)
            if out is not None:
                return out
        return self(self.ops.silu_and_mul(x))

    def norm_and_project(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:  # x, residual: [T, in] -> ([T, out], new residual [T, in])
        """(self(norm(x + residual)), x + residual), or with no residual yet (the first layer)
        (self(norm(x)), x); one kernel where the bundle measured that faster (decode sizes)."""
        if self.ops.norm_linear is not None:
            fused = self.ops.norm_linear(x, residual, norm.weight, norm.eps, self.weight, self.bias)
            if fused is not None:
                return fused
        if residual is None:
            return self(norm(x)), x
        normed, residual = norm.add_and_norm(x, residual)
        return self(normed), residual
