"""Small host -> device copies of a step's index lists, without waiting for the device.

A decode step sends a few short int64 lists to the device (logits rows, continuation ids, beam
indices) behind the work already queued. On CUDA the copy must come from pinned memory to be
asynchronous; `torch.Tensor.pin_memory()` checks the source first (`is_pinned`, a driver query)
and copies it with an aten op, which costs more host time than the copy itself on a step of a
small model. `stage` takes an empty tensor from torch's pinned allocator and fills it with one
host memcpy instead. The allocator keeps the block until the copy reading it has finished (the
non-blocking copy records an event on it), so the block may be dropped at once.

`host_tensor` and `padded_rows` make a step's host inputs (positions, slots, lengths, block
tables; the slots from `block_slots`) through a flat `array.array` read in place: `torch.tensor` of a list converts and checks
each element in Python's object model, several times slower at every size.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch


def stage(values: array.array[int] | list[int], device: torch.device) -> torch.Tensor:
    """int64 `values` on `device` ([len(values)]), the copy queued behind the device's work (on
    the CPU: a tensor over `values` itself when it is an array)."""
    host = host_tensor(values, torch.int64)
    if device.type == "cuda":
        staged = torch.empty(len(host), dtype=torch.int64, pin_memory=True)
        staged.numpy()[:] = host.numpy()
        return staged.to(device, non_blocking=True)
    return host.to(device)


_TYPECODES = {torch.int64: "q", torch.int32: "i"}


def host_tensor(values: Sequence[int] | array.array[int], dtype: torch.dtype) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` for int64 / int32 `values`, on the host ([len(values)]);
    an array of the dtype's typecode is read in place, not copied."""
    if not len(values):
        return torch.empty(0, dtype=dtype)
    code = _TYPECODES[dtype]
    flat = (
        values if isinstance(values, array.array) and values.typecode == code else array.array(code, values)
    )
    return torch.frombuffer(flat, dtype=dtype)


def padded_rows(rows: Sequence[Sequence[int]], width: int, pad: int = 0) -> torch.Tensor:
    """int32 [len(rows), width] on the host: each row, then `pad` up to `width` (>= every row's
    length)."""
    flat: list[int] = []
    for row in rows:
        flat += row
        flat += [pad] * (width - len(row))
    return host_tensor(flat, torch.int32).view(len(rows), width)


def block_slots(block_ids: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """The KV cache slots of positions [start, end) of a sequence whose blocks are `block_ids`:
    consecutive within each block, so made a range a block rather than an expression a token."""
    if end - start == 1:
        return [block_ids[start // block_size] * block_size + start % block_size]
    slots: list[int] = []
    p = start
    while p < end:
        first = block_ids[p // block_size] * block_size + p % block_size
        n = min(block_size - p % block_size, end - p)
        slots += range(first, first + n)
        p += n
    return slots
