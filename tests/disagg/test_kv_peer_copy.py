"""KVCache.copy_blocks_from: a CUDA IPC fetch's blocks copied from the peer's cache into this one's,
one strided slice copy per run of blocks consecutive on both sides (every byte read and written
once), a gather and a scatter past MAX_COPY_RUNS runs; both equal to indexing."""

from __future__ import annotations

import pytest
import torch

from services.worker import kv_cache
from services.worker.kv_cache import KVCache, block_runs


def test_block_runs_follow_both_id_lists() -> None:
    assert block_runs([], []) == []
    assert block_runs([5, 6, 7], [0, 1, 2]) == [(0, 3)]
    # a break on either side starts a run
    assert block_runs([5, 6, 9, 10], [0, 1, 2, 3]) == [(0, 2), (2, 2)]
    assert block_runs([5, 6, 7], [0, 2, 3]) == [(0, 1), (1, 2)]


def _cache(num_blocks: int, gen: torch.Generator) -> KVCache:
    cache = KVCache.__new__(KVCache)
    cache.tensor = torch.randn(3, 2, num_blocks, 4, 2, 8, generator=gen)  # [L, 2, NB, BS, H, D]
    return cache


def test_copy_blocks_from_a_peer_equals_indexing(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    peer = torch.randn(3, 2, 40, 4, 2, 8, generator=gen)
    cases = [
        (list(range(3, 13)), list(range(20, 30))),  # one run
        ([3, 4, 9, 10, 11, 30], [0, 1, 2, 7, 8, 9]),  # three runs
        (torch.randperm(40, generator=gen)[:24].tolist(), torch.randperm(40, generator=gen)[:24].tolist()),
    ]
    for src_ids, dst_ids in cases:
        for layers in ((0, 3), (1, 2)):
            for max_runs in (kv_cache.MAX_COPY_RUNS, 0):  # slice copies, then the gather + scatter
                cache = _cache(40, gen)
                want = cache.tensor.clone()
                l0, l1 = layers
                want[l0:l1, :, dst_ids] = peer[l0:l1][:, :, src_ids]
                monkeypatch.setattr(kv_cache, "MAX_COPY_RUNS", max_runs)
                cache.copy_blocks_from(peer, src_ids, dst_ids, layers)
                assert torch.equal(cache.tensor, want), (src_ids, dst_ids, layers, max_runs)
