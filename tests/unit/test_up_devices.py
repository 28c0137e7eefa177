"""Where `tandem up` puts its workers: spread over the GPUs, sized to their share of a GPU."""

from __future__ import annotations

import pytest

from tandem.up import (
    UpConfig,
    UpError,
    disaggregated_gpus,
    forwarded_worker_args,
    unified_gpus,
    worker_device_args,
)


def test_one_unified_worker_keeps_the_device_option() -> None:
    assert worker_device_args(UpConfig(), "unified", num_gpus=4) == ["--device", "auto"]
    assert worker_device_args(UpConfig(device="cpu", workers=3), "unified", num_gpus=2, index=1) == [
        "--device",
        "cpu",
    ]


def test_unified_workers_spread_over_gpus() -> None:
    config = UpConfig(workers=2)
    assert [worker_device_args(config, "unified", num_gpus=2, index=i) for i in range(2)] == [
        ["--device", "cuda:0"],
        ["--device", "cuda:1"],
    ]
    crowded = UpConfig(workers=3, device="cuda")
    assert [worker_device_args(crowded, "unified", num_gpus=2, index=i) for i in range(3)] == [
        ["--device", "cuda:0", "--gpu-memory-utilization", "0.45"],
        ["--device", "cuda:1", "--gpu-memory-utilization", "0.45"],
        ["--device", "cuda:0", "--gpu-memory-utilization", "0.45"],
    ]
    assert worker_device_args(UpConfig(workers=2), "unified", num_gpus=0) == ["--device", "auto"]


def test_disaggregated_roles_take_one_gpu_each_or_share_one() -> None:
    config = UpConfig(disaggregate=True)
    assert worker_device_args(config, "prefill", num_gpus=2) == ["--device", "cuda:0"]
    assert worker_device_args(config, "decode", num_gpus=2) == ["--device", "cuda:1"]
    assert worker_device_args(config, "decode", num_gpus=1) == [
        "--device",
        "cuda:0",
        "--gpu-memory-utilization",
        "0.45",
    ]
    assert worker_device_args(config, "prefill", num_gpus=0) == ["--device", "cpu"]


def test_disaggregated_tensor_parallel_workers_get_their_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """--prefill/--decode-tensor-parallel-size: each worker its own sizes and, on CUDA, the next
    GPUs by CUDA_VISIBLE_DEVICES (rank r on cuda:r); too few GPUs is a one-line error."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = UpConfig(disaggregate=True, prefill_tensor_parallel_size=2)
    assert "--tensor-parallel-size" not in forwarded_worker_args(config, "decode")
    assert forwarded_worker_args(config, "prefill")[-2:] == ["--tensor-parallel-size", "2"]
    assert worker_device_args(config, "prefill", num_gpus=4) == ["--device", "cuda"]
    assert disaggregated_gpus(config, "prefill", 4) == "0,1"
    assert disaggregated_gpus(config, "decode", 4) == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert disaggregated_gpus(config, "decode", 4) == "6"
    with pytest.raises(UpError, match="needs 3 GPUs \\(one per rank\\), 2 visible"):
        disaggregated_gpus(config, "decode", 2)
    assert worker_device_args(config, "decode", num_gpus=0) == ["--device", "cpu"]
    assert disaggregated_gpus(UpConfig(disaggregate=True), "prefill", 2) == ""  # one GPU each, as before
    with pytest.raises(ValueError, match="--decode-tensor-parallel-size is for --disaggregate"):
        UpConfig(decode_tensor_parallel_size=2)


def test_several_tensor_parallel_workers_each_get_their_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers 2 --tensor-parallel-size 2` on 4 GPUs: worker i's ranks on GPUs 2i, 2i + 1 (named
    as `up`'s own CUDA_VISIBLE_DEVICES names them); too few GPUs is a one-line error."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = UpConfig(workers=2, tensor_parallel_size=2)
    assert [unified_gpus(config, i, num_gpus=4) for i in range(2)] == ["0,1", "2,3"]
    assert worker_device_args(config, "unified", num_gpus=4, index=1) == ["--device", "cuda"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert unified_gpus(config, 1, num_gpus=4) == "6,7"
    assert (
        unified_gpus(UpConfig(workers=1, tensor_parallel_size=2), 0, num_gpus=4) == ""
    )  # ranks on cuda:0..1
    assert unified_gpus(UpConfig(workers=3), 2, num_gpus=4) == ""  # single-rank workers: --device cuda:i
    with pytest.raises(UpError, match="needs 6 GPUs"):
        unified_gpus(UpConfig(workers=3, tensor_parallel_size=2), 0, num_gpus=4)


def test_distributed_backend_is_forwarded_to_the_workers() -> None:
    """`tandem up --tensor-parallel-size 2 --distributed-backend gloo`: each worker's two ranks may
    share one GPU (docs/parallel.md, "One GPU"); auto stays the workers' own default."""
    args = forwarded_worker_args(UpConfig(tensor_parallel_size=2, distributed_backend="gloo"))
    assert args[args.index("--distributed-backend") + 1] == "gloo"
    assert "--distributed-backend" not in forwarded_worker_args(UpConfig(tensor_parallel_size=2))
