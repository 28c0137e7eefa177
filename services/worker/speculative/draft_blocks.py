"""The blocks of a draft's own paged KV cache (a draft model's or an EAGLE head's).

A draft keeps KV for the positions it has seen of each sequence it proposes for, in a small cache
of its own beside the target's. Blocks are handed out from one free list as a sequence's positions
grow and given back when the draft forgets the sequence; the block manager of the target is not
involved (in a group the draft lives on rank 0 alone).
"""

from __future__ import annotations


class DraftBlocks:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = 0
        self.free: list[int] = []

    def reset(self, num_blocks: int) -> None:
        """A cache of `num_blocks` blocks, all free."""
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def missing(self, block_ids: list[int], num_positions: int) -> int:
        """Blocks `block_ids` lacks to hold `num_positions` positions (<= 0: none)."""
        return -(-num_positions // self.block_size) - len(block_ids)

    def grow(self, block_ids: list[int], num_positions: int) -> bool:
        """Append free blocks to `block_ids` until it holds `num_positions` positions; False (and
        nothing taken) when too few are free."""
        need = self.missing(block_ids, num_positions)
        if need > len(self.free):
            return False
        for _ in range(max(need, 0)):
            block_ids.append(self.free.pop())
        return True

    def give_back(self, block_ids: list[int]) -> None:
        self.free += block_ids
