"""Programmatic dependent launch (PDL) for the decode-step kernels, and the L2 weight prefetch it
makes possible (Hopper and later).

A batch-1 decode step is ~290 dependent kernels; most are latency-bound (RMSNorm, rotary + KV
write, decode attention, SiLU) and leave the memory bus idle for ~15 us per layer, and every GEMM
starts with a ramp of first loads. With PDL a kernel is launched *before* its predecessor has
finished (as soon as every program of the predecessor has executed `griddepcontrol.launch_dependents`),
its programs wait in `griddepcontrol.wait` until the predecessor has completed and its writes are
visible, and whatever they do before the wait overlaps the predecessor. Weights are never written
during a step, so a skinny GEMM prefetches its weight rows into L2 before waiting (skinny_gemm.py):
the weights then stream while the small kernels before it run.

The rules every PDL kernel here follows (they keep the step's data dependencies exact):
- every program executes `gdc_wait()` unconditionally before it reads or writes any activation,
  cache or scratch buffer, and before it exits (a kernel that completed without waiting would let
  the next one run ahead of *its* predecessor);
- before the wait, only memory no kernel of the step writes (weights) may be touched, and only by
  prefetch;
- small latency-bound kernels signal `gdc_launch_dependents()` at their start; GEMMs signal after
  their main loop, so the next GEMM's prefetch does not evict their own weights from L2.
A kernel launched without PDL (cuBLAS, torch ops) still waits for full completion of what came
before, so mixing is safe. `TANDEM_PDL=0` turns it off (kernels then run exactly as before).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ENABLED: dict[int, bool] = {}


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL: CUDA compute capability >= 9.0, not off."""
    if device.type != "cuda" or os.environ.get("TANDEM_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ENABLED:
        _ENABLED[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _ENABLED[index]


def mode(device: torch.device) -> int:
    """The `PDL` constexpr of the small kernels: 0 off, 1 signal the next kernel at the start,
    2 at the end (`TANDEM_PDL_TRIGGER=start|end`, default start)."""
    if not enabled(device):
        return 0
    return 2 if os.environ.get("TANDEM_PDL_TRIGGER", "start") == "end" else 1


@triton.jit
def enter(PDL: tl.constexpr):
    """Start of a small kernel: maybe let the next kernel launch, then wait for this one's inputs."""
    if PDL == 1:
        gdc_launch_dependents()
    if PDL != 0:
        gdc_wait()


@triton.jit
def leave(PDL: tl.constexpr):
    """End of a small kernel (mode 2): let the next kernel launch."""
    if PDL == 2:
        gdc_launch_dependents()


def launch_options(device: torch.device) -> dict[str, bool]:
    """Extra keyword arguments of a Triton launch: `launch_pdl=True` where PDL is enabled."""
    return {"launch_pdl": True} if enabled(device) else {}


def prefetch_budget_bytes() -> int:
    """Bytes of weights one skinny GEMM prefetches into L2 before its wait, in all
    (`TANDEM_PDL_PREFETCH_MB`, default 24; 0: no prefetch)."""
    return int(float(os.environ.get("TANDEM_PDL_PREFETCH_MB", "24")) * (1 << 20))


@triton.jit
def prefetch_l2(addr, NBYTES: tl.constexpr):
    """Bulk-prefetch NBYTES (a multiple of 16) at each address of `addr` (int64 tensor, 16-byte
    aligned) into L2 (`cp.async.bulk.prefetch.L2`, sm_90+). Fire and forget: nothing waits for it."""
    size = tl.full(addr.shape, NBYTES, tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; // dummy $0",
        "=r,l,r",
        [addr, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
