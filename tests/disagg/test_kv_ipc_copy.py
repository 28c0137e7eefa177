"""A CUDA IPC fetch's copy, the part the CPU can check: which copies `copy_ipc_blocks` makes
(`ipc_copy_spans`: one of every layer and block on CUDA, pieces on the CPU), the order of its
engine-thread stages (the copies enqueued, the request handed to the scheduler, then the wait),
and the benchmark's per-stage medians of the log line's moments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker import kv_transports
from services.worker.kv_transfer import IpcBlocks, KVReservation, copy_ipc_blocks, ipc_copy_spans

SHAPE = (3, 2, 40, 4, 2, 8)  # [L, 2, NB, BS, H, D]
LAYER_BLOCK_BYTES = 2 * 4 * 2 * 8 * 4  # one block of one layer, K and V, fp32


def _ipc(block_start: int, block_ids: list[int]) -> IpcBlocks:
    return IpcBlocks(kv_transports.SharedTensor("test:0:x", b""), block_start, tuple(block_ids))


def test_one_launch_is_one_span_of_every_layer_and_block() -> None:
    ids = [9, 3, 30, 31, 4]
    spans = ipc_copy_spans(SHAPE, LAYER_BLOCK_BYTES, _ipc(2, ids), KVReservation(8, 7), 1, one_launch=True)
    assert spans == [((0, 3, 2, 7), ids)]


@pytest.mark.parametrize("target", [1, LAYER_BLOCK_BYTES * 2, LAYER_BLOCK_BYTES * 7, 1 << 30])
def test_pieces_cover_every_layer_block_once_with_the_peers_ids(target: int) -> None:
    ids = [9, 3, 30, 31, 4]
    spans = ipc_copy_spans(SHAPE, LAYER_BLOCK_BYTES, _ipc(2, ids), KVReservation(8, 7), target, False)
    seen = []
    for (l0, l1, b0, b1), src_ids in spans:
        assert src_ids == ids[b0 - 2 : b1 - 2]
        seen += [(layer, block) for layer in range(l0, l1) for block in range(b0, b1)]
    assert sorted(seen) == [(layer, block) for layer in range(3) for block in range(2, 7)]


@pytest.mark.parametrize(("block_start", "count"), [(1, 6), (2, 4), (3, 4)])
def test_blocks_other_than_the_reservations_are_refused(block_start: int, count: int) -> None:
    with pytest.raises(ValueError, match="expected \\[2, 7\\)"):
        ipc_copy_spans(
            SHAPE, LAYER_BLOCK_BYTES, _ipc(block_start, list(range(count))), KVReservation(8, 7), 1, True
        )


class _Engine:
    """The engine's side of a fetch, recording its calls; copies as Engine.copy_peer_kv does."""

    def __init__(self, kv: torch.Tensor, dst_blocks: list[int], gone: bool = False, fail: bool = False):
        self.kv, self.dst_blocks, self.gone, self.fail = kv, dst_blocks, gone, fail
        self.calls: list[str] = []

    def copy_peer_kv(self, request_id: str, span: Any, remote: torch.Tensor, src_ids: list[int]) -> bool:
        self.calls.append("copy")
        if self.fail:
            raise RuntimeError("launch failed")
        if self.gone:
            return False
        l0, l1, b0, b1 = span
        self.kv[l0:l1, :, self.dst_blocks[b0:b1]] = remote[l0:l1][:, :, src_ids]
        return True

    def kv_fetched(self, request_id: str) -> None:
        self.calls.append("fetched")


def _exported(gen: torch.Generator) -> tuple[torch.Tensor, kv_transports.SharedTensor]:
    peer = torch.randn(*SHAPE, generator=gen)
    return peer, kv_transports.export_tensor(peer)  # (read back in this process, as two workers in one)


def test_copy_then_hand_over_then_wait_and_the_bytes_land() -> None:
    gen = torch.Generator().manual_seed(3)
    peer, shared = _exported(gen)
    kv = torch.zeros(SHAPE)
    dst = [5, 6, 7, 20, 21, 22, 0]  # the request's blocks; the first two its own prefix cache's
    src = [11, 12, 13, 39, 1]
    engine = _Engine(kv, dst)
    done = copy_ipc_blocks(engine, kv, "r", IpcBlocks(shared, 2, tuple(src)), KVReservation(8, 7), 1 << 30)
    assert engine.calls == ["copy", "fetched"]
    assert done.num_bytes == 3 * 5 * LAYER_BLOCK_BYTES
    assert list(done.moments) == ["on engine", "mapped", "launched", "handed over", "synced"]
    assert list(done.moments.values()) == sorted(done.moments.values())
    assert done.device_seconds == 0.0  # (the CPU)
    assert torch.equal(kv[:, :, dst[2:]], peer[:, :, src])
    assert not kv[:, :, dst[:2]].any()  # the blocks the decode worker already held are not written


def test_a_request_gone_meanwhile_is_not_handed_over() -> None:
    _, shared = _exported(torch.Generator().manual_seed(4))
    kv = torch.zeros(SHAPE)
    engine = _Engine(kv, list(range(7)), gone=True)
    done = copy_ipc_blocks(engine, kv, "r", IpcBlocks(shared, 2, (1, 2, 3, 4, 5)), KVReservation(8, 7), 1)
    assert engine.calls == ["copy"]
    assert done.num_bytes == 0


def test_a_failed_copy_raises_and_hands_nothing_over() -> None:
    _, shared = _exported(torch.Generator().manual_seed(5))
    kv = torch.zeros(SHAPE)
    engine = _Engine(kv, list(range(7)), fail=True)
    with pytest.raises(RuntimeError, match="launch failed"):
        copy_ipc_blocks(engine, kv, "r", IpcBlocks(shared, 2, (1, 2, 3, 4, 5)), KVReservation(8, 7), 1)
    assert engine.calls == ["copy"]


def test_the_benchmark_takes_each_stage_from_the_one_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from benchmarks.kv_transfer_bench import stage_medians

    lines = [
        "reserved 0.50, first item 2.00, on engine 2.10, copied 4.00, closed 4.10",
        "reserved 1.00, first item 2.00, on engine 2.50, copied 3.00, closed 3.50",
        "reserved 0.70, first item 2.20, on engine 2.30, copied 3.30, closed 3.40",
    ]
    got = stage_medians(lines)
    assert list(got) == ["reserved", "first item", "on engine", "copied", "closed"]
    assert got == pytest.approx(
        {"reserved": 0.7, "first item": 1.5, "on engine": 0.1, "copied": 1.0, "closed": 0.1}
    )
