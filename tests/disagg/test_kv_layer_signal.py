"""The layer-wise push's cost to the prefill: a layer wakes the readers (and, on CUDA, costs the
thread launching the forward a CUDA event) only while a reader takes layers as they come; a CUDA
IPC fetch, which waits for the end, hears only the end."""

from __future__ import annotations

import torch

from services.worker.kv_layerwise import LayerProgress, LayerSignal


def test_layers_wake_only_a_per_layer_reader() -> None:
    signal = LayerSignal(torch.device("cpu"))
    progress = LayerProgress(num_layers=4, num_tokens=32, block_size=16)
    heard: list[str] = []
    progress.listen(lambda: heard.append("end"), per_layer=False)  # a CUDA IPC fetch's wait
    signal.arm([(progress, 32)])
    signal.written(0)
    signal.written(1)
    assert signal.num_signals == 0 and heard == []
    # counted silently (on the CPU the writes are done): a reader that comes later sees them
    assert progress.snapshot().ready_blocks == (2, 2, 0, 0)
    unsubscribe = progress.listen(lambda: heard.append("layer"))  # a gRPC reader arrives mid-step
    signal.written(2)
    assert signal.num_signals == 1 and heard == ["layer"]
    assert progress.snapshot().ready_blocks == (2, 2, 2, 0)
    unsubscribe()
    signal.written(3)
    assert signal.num_signals == 1 and heard == ["layer"]
    assert progress.snapshot().ready_blocks == (2, 2, 2, 2)
    signal.disarm()
    progress.complete(first=object())
    assert sorted(heard) == ["end", "layer"]
    assert progress.snapshot().complete
