"""Worker options of a parallel group that cannot work are refused when parsed, in one line."""

from __future__ import annotations

from typing import Any

import pytest

from services.worker.config import WorkerConfig
from services.worker.model_config import ModelConfigError
from services.worker.parallel import ParallelState, resolve_backend, shard_layout, stage_layers
from tests.worker.worker_testlib import TINY


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_parallel_size": 2, "nnodes": 2}, "needs --master-port"),
        ({"tensor_parallel_size": 3, "nnodes": 2, "master_port": 29500}, "must be a multiple of --nnodes 2"),
        ({"nnodes": 2, "node_rank": 2, "master_port": 29500}, "--node-rank must be in 0..1"),
        ({"pipeline_parallel_size": 0}, "--pipeline-parallel-size must be >= 1"),
        ({"tensor_parallel_size": 2, "device": "cpu", "distributed_backend": "nccl"}, "needs --device cuda"),
    ],
)
def test_bad_group_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerConfig(model="m", **options)


def test_distributed_backend_and_graph_capture() -> None:
    """--distributed-backend: auto = NCCL on CUDA, gloo on the CPU; a group's decode CUDA graphs
    only where the collectives can be captured (NCCL; gloo's run on the host)."""
    assert resolve_backend("auto", "cuda") == "nccl" and resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ModelConfigError, match="needs CUDA"):
        resolve_backend("nccl", "cpu")
    assert ParallelState().graphs_capturable  # one rank: no collective
    assert ParallelState(tp_size=2, backend="nccl", device_type="cuda").graphs_capturable
    gloo = ParallelState(tp_size=2, backend="gloo", device_type="cuda")
    assert not gloo.graphs_capturable and gloo.gloo_on_cuda
    assert not ParallelState(tp_size=2, backend="gloo").gloo_on_cuda


def test_host_kv_tier_is_accepted_in_a_group() -> None:
    """--kv-offload-memory in a group: each rank holds that much for its own shard (it was refused
    before the ranks replayed rank 0's host copies; tests/parallel/test_kv_offload_parallel.py)."""
    config = WorkerConfig(model="m", tensor_parallel_size=2, pipeline_parallel_size=2, kv_offload_memory="1")
    assert config.kv_offload_bytes == 2**30


def test_stages_and_replicated_kv_heads(tmp_path: Any) -> None:
    """Layers split evenly, the first stages taking the remainder; with T > KV heads each rank
    holds the KV head its query heads use."""
    assert [stage_layers(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]
    assert [stage_layers(4, 4, s) for s in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.worker.model_config import load_model_config

    LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=1)).save_pretrained(str(tmp_path))
    cfg = load_model_config(str(tmp_path))  # 4 query heads, 2 KV heads
    layouts = [shard_layout(cfg, ParallelState(4, r)) for r in range(4)]
    assert [(lo.num_heads, lo.num_kv_heads, lo.kv_head_start) for lo in layouts] == [
        (1, 1, 0),
        (1, 1, 0),
        (1, 1, 1),
        (1, 1, 1),
    ]
    for lo in layouts:  # query head q uses KV head q // (4 / 2)
        assert lo.kv_head_start == lo.q_head_start // 2
