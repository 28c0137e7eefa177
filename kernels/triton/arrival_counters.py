"""Arrival counters of the kernels whose last program to finish does the merge (a "last block"
reduction, CUDA's threadFenceReduction pattern): zeros between launches, each launch's merging
program resets its own, so a CUDA graph replays them with no memset launch.

Each kernel family has its own buffer (`owner`) per device, allocated once, outside any CUDA-graph
capture (the graphs then read that same buffer). A family's kernels on a device run one at a time
(one stream), so one buffer a family suffices (decode attention's split merge, the MoE router, the split
down GEMV).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}
MIN_COUNTERS = 1 << 14


def arrival_counters(owner: str, device: torch.device, needed: int) -> torch.Tensor:
    """At least `needed` int32 zeros on `device`, the same buffer every call of `owner`."""
    key = (owner, device)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{owner} needs its arrival counters before CUDA-graph capture (run one eager step first)"
            )
        buf = torch.zeros(max(needed, MIN_COUNTERS), dtype=torch.int32, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # zeroed before any stream uses it
        _BUFFERS[key] = buf
    return buf
