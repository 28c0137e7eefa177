"""Programmatic dependent launch (PDL) for the decode-step kernels (Hopper and later).

A batch-1 decode step is ~290 dependent kernels, most of them short; between two of them the GPU
drains the first and then launches and ramps up the second. With PDL a kernel is launched before
its predecessor has finished (once every program of the predecessor has executed
`griddepcontrol.launch_dependents`); its programs wait in `griddepcontrol.wait` until the
predecessor has completed and its writes are visible, so the launch overlaps the predecessor's tail.

The rules every PDL kernel here follows (they keep the step's data dependencies exact):
- every program executes the wait unconditionally before it reads or writes any activation, cache
  or scratch buffer, and before it exits (a kernel that completed without waiting would let the
  next one run ahead of *its* predecessor);
- it signals its dependents at its end (small kernels) or after its main loop (the skinny GEMM);
  a skinny GEMM followed by a short latency-bound kernel (qkv -> decode attention, gate/up -> SiLU)
  signals right after its wait instead (`early_signal`), so that kernel's programs launch beside the
  GEMM's and their pre-wait loads overlap the weight stream (measured faster: round 6 in
  docs/gpu.md);
- before its wait it may load only what the previous kernel does not write: the step's inputs
  (metadata, block tables, cos/sin) and anything written two or more kernels back (once a kernel
  runs, its predecessor has passed its own wait, so everything before that is complete). The
  decode attention kernel uses this for the residual stream's 1/rms and the cached K/V.
A kernel launched without PDL (cuBLAS, torch ops) still waits for full completion of what came
before, so mixing is safe. `TANDEM_PDL=0` turns it off (kernels then run exactly as before).

PDL pays where launches dominate a step (small models at batch 1) and is within run-to-run spread
where weight streaming does (benchmarks/pdl_decode_run.sh; figures in docs/gpu.md). Variants
measured slower and not kept: signalling at the start of the small kernels (the cascade of early
launches parks the next GEMM's programs on the SMs while cuBLAS still runs its second wave), an L2
prefetch of the GEMM's weights before its wait (it competes with the running GEMM for bandwidth
and evicts its lines), and decode attention signalling right after its wait (round 5) or after
its partials, before the merge (round 6): early signals go only towards short kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from services.common import switches

_ENABLED: dict[int, bool] = {}
_OFF = not switches.PDL.value  # read once: `enabled` runs on every launch


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL: CUDA compute capability >= 9.0, not off."""
    if _OFF or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ENABLED:
        _ENABLED[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _ENABLED[index]


@triton.jit
def enter(PDL: tl.constexpr):
    """Start of a kernel: wait until the previous kernel completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def leave(PDL: tl.constexpr):
    """End of a kernel: let the next kernel launch (it waits on this one in `enter`)."""
    if PDL:
        gdc_launch_dependents()


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments of a launch of a kernel with a `PDL` constexpr: the constexpr, and
    `launch_pdl=True` where PDL is enabled (one lookup per launch)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
