"""The device / dtype cases every kernel test runs and the checks they share.

CPU: Triton's interpreter in fp32 and fp16 (conftest sets TRITON_INTERPRET=1); CUDA (`gpu` marker):
bf16, whose `tl.dot` the interpreter gets wrong.
"""

from __future__ import annotations

import pytest
import torch

CPU_CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
]
GPU_CASES = [pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu)]
CASES = CPU_CASES + GPU_CASES


def skip_without(device: str) -> None:
    """Skip a CUDA case on a machine without a GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def tol_for(dtype: torch.dtype) -> float:
    """The relative error a kernel may have against its reference in this dtype."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (out must hold no NaN)."""
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))
