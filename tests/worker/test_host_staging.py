"""host_staging.stage: int64 index lists on the device, queued behind the device's work."""

from __future__ import annotations

import array

import pytest
import torch

from services.worker.host_staging import stage


def test_stage_on_the_cpu_keeps_the_values() -> None:
    cpu = torch.device("cpu")
    assert stage([3, -1, 2**40], cpu).tolist() == [3, -1, 2**40]
    assert stage(array.array("q", [7, 8]), cpu).dtype == torch.int64
    assert stage([], cpu).shape == (0,)


@pytest.mark.gpu
def test_staged_lists_arrive_intact_on_cuda_while_the_device_is_busy() -> None:
    """Many stagings queued behind slow device work, their pinned blocks dropped at once: the
    allocator must not hand a block to the next staging before its copy has read it."""
    device = torch.device("cuda")
    big = torch.randn(4096, 4096, device=device)
    lists = [list(range(i, i + 1 + i % 97)) for i in range(2000)]
    staged = []
    for i, values in enumerate(lists):
        if i % 100 == 0:
            big = big @ big / 64  # (keeps the stream busy while the copies queue behind it)
        staged.append(stage(values, device))
    torch.cuda.synchronize()
    assert all(t.tolist() == values for t, values in zip(staged, lists, strict=True))
    assert stage([], device).shape == (0,)
