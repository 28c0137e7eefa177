"""nn.Linear whose forward goes through the kernel bundle's `linear` when it has one.

Same parameters and names as nn.Linear (the loader and checkpoints see no difference). On the
CPU (reference bundle, `linear` is None) it is exactly nn.Linear; on CUDA the Triton bundle sends
decode-sized inputs to a skinny-GEMM kernel for the shapes where it measured faster than cuBLAS
(kernels/triton/skinny_gemm.py), everything else to F.linear.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps


class Linear(nn.Linear):
    def __init__(self, ops: KernelOps, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.ops.linear is None:
            return super().forward(x)
        return self.ops.linear(x, self.weight, self.bias)
