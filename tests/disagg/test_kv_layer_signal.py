"""The layer-wise push's cost to the prefill: a layer is signalled (a CUDA event recorded by the
thread launching the forward, the readers' event loop woken) only while a reader takes layers as
they come; a CUDA IPC fetch, which waits for the end, hears only the end."""

from __future__ import annotations

import torch

from services.worker.kv_layerwise import LayerProgress, LayerSignal


def test_layers_are_signalled_only_for_a_per_layer_reader() -> None:
    signal = LayerSignal(torch.device("cpu"))
    progress = LayerProgress(num_layers=4, num_tokens=32, block_size=16)
    heard: list[str] = []
    progress.listen(lambda: heard.append("end"), per_layer=False)  # a CUDA IPC fetch's wait
    signal.arm([(progress, 32)])
    signal.written(0)
    signal.written(1)
    assert signal.num_signals == 0 and heard == []
    assert progress.snapshot().ready_blocks == (0, 0, 0, 0)
    unsubscribe = progress.listen(lambda: heard.append("layer"))  # a gRPC reader arrives mid-step
    signal.written(2)  # covers the layers written before it in this step
    assert signal.num_signals == 1 and heard == ["layer"]
    assert progress.snapshot().ready_blocks == (2, 2, 2, 0)
    unsubscribe()
    signal.written(3)
    assert signal.num_signals == 1 and heard == ["layer"]
    signal.arm([(progress, 32)])  # the next step starts afresh: nothing left over from the last
    progress.listen(lambda: heard.append("layer"))
    signal.written(3)
    assert progress.snapshot().ready_blocks == (2, 2, 2, 2)
    signal.disarm()
    progress.complete(first=object())
    assert sorted(heard) == ["end", "layer", "layer", "layer"]
    assert progress.snapshot().complete
