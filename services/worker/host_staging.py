"""Small host -> device copies of a step's index lists, without waiting for the device.

A decode step sends a few short int64 lists to the device (logits rows, continuation ids, beam
indices) behind the work already queued. On CUDA the copy must come from pinned memory to be
asynchronous; `torch.Tensor.pin_memory()` checks the source first (`is_pinned`, a driver query)
and copies it with an aten op, which costs more host time than the copy itself on a step of a
small model. `stage` takes an empty tensor from torch's pinned allocator and fills it with one
host memcpy instead. The allocator keeps the block until the copy reading it has finished (the
non-blocking copy records an event on it), so the block may be dropped at once.

`host_tensor` and `padded_rows` make a step's host inputs (positions, slots, lengths, block
tables) through a flat `array.array` read in place: `torch.tensor` of a list converts and checks
each element in Python's object model, several times slower at every size.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch


def stage(values: array.array[int] | list[int], device: torch.device) -> torch.Tensor:
    """int64 `values` on `device` ([len(values)]), the copy queued behind the device's work (on
    the CPU: a tensor over `values` itself when it is an array)."""
    flat = values if isinstance(values, array.array) else array.array("q", values)
    host = torch.frombuffer(flat, dtype=torch.int64) if len(flat) else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        staged = torch.empty(len(flat), dtype=torch.int64, pin_memory=True)
        staged.numpy()[:] = host.numpy()
        return staged.to(device, non_blocking=True)
    return host.to(device)


_TYPECODES = {torch.int64: "q", torch.int32: "i"}


def host_tensor(values: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` for int64 / int32 `values`, on the host ([len(values)])."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype)


def padded_rows(rows: Sequence[Sequence[int]], width: int, pad: int = 0) -> torch.Tensor:
    """int32 [len(rows), width] on the host: each row, then `pad` up to `width` (>= every row's
    length)."""
    flat: list[int] = []
    for row in rows:
        flat += row
        flat += [pad] * (width - len(row))
    if not flat:
        return torch.empty(len(rows), width, dtype=torch.int32)
    return torch.frombuffer(array.array("i", flat), dtype=torch.int32).view(len(rows), width)
