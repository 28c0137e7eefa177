"""The kernel API the worker calls: a bundle of pure functions chosen once per worker.

`get_ops("reference", cpu)` gives the PyTorch twins in `kernels/reference.py`; `get_ops("triton", cuda)`
gives the Triton kernels in `kernels/triton/` (each falling back to the reference where a shape is
unsupported, e.g. head_dim < 16). "auto" picks triton on CUDA and reference elsewhere.
Layouts and semantics: each function's docstring in kernels/reference.py (the twins) and `KernelOps` below.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.ops import KernelOps
from kernels.reference import build_rope_cache

__all__ = ["BACKENDS", "KernelOps", "build_rope_cache", "get_ops"]

BACKENDS = ("auto", "triton", "reference")


REFERENCE_OPS = KernelOps(
    name="reference",
    write_kv_cache=reference.write_kv_cache,
    paged_attention=reference.paged_attention,
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    rotary=reference.rotary,
    silu_and_mul=reference.silu_and_mul,
    linear_rms_norm=reference.linear_rms_norm,
    linear_add=reference.linear_add,
    silu_and_mul_rms=reference.silu_and_mul_rms,
)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_ops(backend: str, device: torch.device | str) -> KernelOps:
    """The kernel bundle for `backend` ("auto" | "triton" | "reference") on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention/kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "reference" or (backend == "auto" and (device.type != "cuda" or not _triton_available())):
        return REFERENCE_OPS
    if backend == "triton" and not _triton_available():
        raise ValueError("backend 'triton' needs the triton package, which is not installed")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS
