"""host_staging.stage: int64 index lists on the device, queued behind the device's work; and a
step's host inputs (`host_tensor`, the slots of `block_slots`) and block table (`padded_rows`)
equal to `torch.tensor`'s."""

from __future__ import annotations

import array

import pytest
import torch

from services.worker.host_staging import block_slots, host_tensor, padded_rows, stage


def test_stage_on_the_cpu_keeps_the_values() -> None:
    cpu = torch.device("cpu")
    assert stage([3, -1, 2**40], cpu).tolist() == [3, -1, 2**40]
    assert stage(array.array("q", [7, 8]), cpu).dtype == torch.int64
    assert stage([], cpu).shape == (0,)
    assert host_tensor(array.array("i", [4, 5]), torch.int32).tolist() == [4, 5]  # (read in place)


def test_host_tensor_equals_torch_tensor_of_the_list() -> None:
    for dtype in (torch.int64, torch.int32):
        for values in ([], [7], [0, -1, 2**31 - 1, 5], list(range(3000))):
            made = host_tensor(values, dtype)
            assert made.dtype == dtype and torch.equal(made, torch.tensor(values, dtype=dtype))


def test_block_slots_are_each_position_s_slot() -> None:
    blocks, bs = [7, 3, 12, 0, 5], 4
    for start, end in ((0, 1), (6, 7), (0, 20), (3, 4), (3, 9), (5, 17), (8, 12)):
        assert block_slots(blocks, bs, start, end) == [
            blocks[p // bs] * bs + p % bs for p in range(start, end)
        ]


def test_padded_rows_equal_torch_tensor_of_the_padded_lists() -> None:
    import gc
    import random

    rng = random.Random(0)
    for n in (1, 3, 64):
        rows = [[rng.randrange(2**31 - 1) for _ in range(rng.randrange(0, 40))] for _ in range(n)]
        width = max(len(r) for r in rows) + rng.randrange(3)
        table = padded_rows(rows, width)
        gc.collect()  # (the flat array behind the tensor lives as long as the tensor)
        expected = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
        assert table.dtype == torch.int32 and torch.equal(table, expected)
    assert padded_rows([], 4).shape == (0, 4)
    assert padded_rows([[], []], 0).shape == (2, 0)


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
