"""A beam step's own device work is a fixed number of ops, whatever the batch and the model depth.

On a small model a decode step is short (a couple of ms on a GPU), and each op of the beam step is
a launch and host time that sampling's steps do not pay (docs/beam_search.md, "Host time of a beam
step"). These tests count the aten ops that the beam-specific parts of a step dispatch
(`BeamStep.select`, `BeamStep.ahead` of services/worker/beam_step.py, the KV block copy): one host->device copy
of indices for each (the selection's own with the runner's), the KV copy of every beam's partly
filled block one gather and one scatter over all layers, and no op per beam, request or layer."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from services.common.sampling import SamplingParams
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import KVCache


def tiny_llama(root: Path, layers: int) -> Path:
    path = root / f"llama{layers}"
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


class _Ops(TorchDispatchMode):
    """Counts the aten ops dispatched while inside (and `on`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.on = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.on:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(obj: Any, names: list[str], ops: _Ops, calls: list[Counter[str]]) -> Iterator[None]:
    """Each call of obj.<name> (not nested) appends the ops it dispatched to `calls`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if ops.on:
                return fn(*args, **kwargs)
            before = ops.counts.copy()
            ops.on = True
            try:
                return fn(*args, **kwargs)
            finally:
                ops.on = False
                calls.append(ops.counts - before)

        return wrapper

    for name in names:
        setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(obj, name)


def beam_step_ops(tmp_path: Path, layers: int, requests: int, width: int) -> dict[str, list[Counter[str]]]:
    engine = Engine(
        WorkerConfig(
            model=str(tiny_llama(tmp_path, layers)),
            load_format="dummy",
            device="cpu",
            max_num_seqs=16,
            max_model_len=64,
            block_size=4,  # (a partly filled block at 3 positions of 4: copied on the device)
            async_scheduling="on",
        )
    )
    prompts = [[5 + i, 17, 23 + i, 31, 40] for i in range(requests)]
    sp = SamplingParams(temperature=0.0, n=width, use_beam_search=True, max_tokens=10, ignore_eos=True)
    ops = _Ops()
    found: dict[str, list[Counter[str]]] = {"select": [], "ahead": []}
    with (
        ops,
        counting(engine.runner.beams, ["select"], ops, found["select"]),
        counting(engine.runner.beams, ["ahead"], ops, found["ahead"]),
    ):
        results = engine.generate(prompts, sp)
    assert all(len(r.token_ids) == width for r in results)
    assert engine.scheduler.num_beam_steps_ahead > 0
    return found


def per_call(calls: list[Counter[str]]) -> list[int]:
    """The ops of each call (the beam rows' [N, V] log-softmax is a view when they are the step's
    rows in order, else an index_select: one op either way)."""
    return [sum(c.values()) for c in calls]


def test_beam_step_ops_do_not_grow_with_beams_requests_or_layers(tmp_path: Path) -> None:
    small = beam_step_ops(tmp_path / "a", layers=2, requests=1, width=2)
    large = beam_step_ops(tmp_path / "b", layers=4, requests=3, width=4)
    for part in ("select", "ahead"):
        assert small[part] and large[part]
    # step by step the same (those with a partly filled block to copy dispatch the copy's ops)
    assert per_call(small["ahead"]) == per_call(large["ahead"])
    # (the first two steps are synchronous; the beams' rows are in the order the selection reads
    # them: BeamSearch puts them so in the running list)
    assert per_call(small["select"])[2:] == per_call(large["select"])[2:]
    # regression guards: the ops of a step launched ahead, and of the synchronous ones
    assert max(per_call(large["select"])[2:]) <= 23, per_call(large["select"])
    assert max(per_call(large["select"])[:2] + per_call(small["select"])[:2]) <= 27
    assert max(per_call(large["ahead"])) <= 14, per_call(large["ahead"])
    for calls in small["ahead"] + large["ahead"] + small["select"][2:] + large["select"][2:]:
        # every index in at most one host->device copy (`to_device_lists`: one host array read in
        # place, no `torch.tensor` of a list; none when there is no index), its views made by one
        # split
        assert calls["aten.split_with_sizes"] <= 1 and calls["aten.lift_fresh"] == 0, calls
    for calls in small["ahead"] + large["ahead"]:
        assert calls["aten.split_with_sizes"] == 1, calls
        # the partly filled blocks of every beam, all layers: one gather, one scatter
        assert calls["aten.index_copy_"] <= 1, calls


@pytest.mark.parametrize("layers", [1, 3])
def test_copy_block_tensors_equals_per_layer_copies(layers: int) -> None:
    """KVCache.copy_block_tensors copies every layer's K and V of each block in one op pair (a
    gather, a scatter)."""
    cache = KVCache.__new__(KVCache)
    cache.tensor = torch.randn(layers, 2, 10, 4, 2, 8)
    expected = cache.tensor.clone()
    src, dst = torch.tensor([1, 4, 7]), torch.tensor([2, 5, 9])
    for layer in range(layers):
        for kv in range(2):
            for s, d in zip(src.tolist(), dst.tolist(), strict=True):
                expected[layer, kv, d] = expected[layer, kv, s]
    ops = _Ops()
    with ops:
        ops.on = True
        cache.copy_block_tensors(src, dst)
    assert torch.equal(cache.tensor, expected)
    assert ops.counts["aten.index_copy_"] == 1 and sum(ops.counts.values()) == 2, ops.counts


def test_copy_block_tensors_reads_every_source_before_writing() -> None:
    """Beams launched ahead write their own partly filled block in place: one beam's source block
    may be another's destination (beam 0 takes beam 1's block and beam 1 beam 0's), and a beam
    whose parent is itself copies its block onto itself. Every destination gets its source's
    content from before the copy."""
    cache = KVCache.__new__(KVCache)
    cache.tensor = torch.randn(2, 2, 6, 4, 2, 8)
    before = cache.tensor.clone()
    src, dst = torch.tensor([1, 2, 3, 1]), torch.tensor([2, 1, 3, 4])
    cache.copy_block_tensors(src, dst)
    for s, d in zip(src.tolist(), dst.tolist(), strict=True):
        assert torch.equal(cache.tensor[:, :, d], before[:, :, s]), (s, d)
    assert torch.equal(cache.tensor[:, :, [0, 5]], before[:, :, [0, 5]])
