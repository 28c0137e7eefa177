"""The device / dtype cases every kernel test runs and the checks they share.

CPU: Triton's interpreter in fp32 and fp16 (conftest sets TRITON_INTERPRET=1); CUDA (`gpu` marker):
bf16, whose `tl.dot` the interpreter gets wrong. Also the random quantized weights the quantized
GEMMs' tests share, and the reference bundle with its norms unfolded.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import REFERENCE_OPS, KernelOps

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


# ---- quantized weights (test_quant_gemm.py, test_quant_fused.py) ---------------------------------


def quantized_weight(
    n: int, k: int, bits: int, group_size: int, asym: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random integer weight [N, K] as (codes, packed, scales, zeros): int8 codes in [-127, 127]
    (packed: the codes), or 4-bit codes in [0, 15] packed two a byte (low nibble: the even column);
    per-group scales [N, K / group_size] fp32; zero points [N, groups] (asym) or None."""
    groups = k // group_size
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        packed = q
    else:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (n, groups), generator=gen).float() if asym else None
    return q, packed, scales, zeros


def fp8_weight_codes(
    n: int, k: int, gen: torch.Generator, spread: float, scale: float, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 weight codes [N, K] (normal with std `spread`, clamped to e4m3's +-448) and
    per-channel scales [N, 1] fp32, uniform in [floor, floor + scale)."""
    w = (torch.randn(n, k, generator=gen) * spread).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w, torch.rand(n, 1, generator=gen) * scale + floor


# The reference bundle without the folded-RMSNorm ops: a model on it keeps its norms unfolded.
UNFOLDED_OPS = dataclasses.replace(
    REFERENCE_OPS, linear_rms_norm=None, linear_add=None, silu_and_mul_rms=None
)


def triton_quant_ops() -> KernelOps:
    """The reference bundle with the Triton quantized GEMMs (the interpreter on the CPU): a
    quantized model's Linear layers call them through KernelOps."""
    from kernels.triton.quant_gemm import quant_linear, quant_linear_fused

    return dataclasses.replace(
        REFERENCE_OPS, quant_linear=quant_linear, quant_linear_fused=quant_linear_fused
    )
