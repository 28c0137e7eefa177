"""Where `tandem up` puts its workers: spread over the GPUs, sized to their share of a GPU."""

from __future__ import annotations

from tandem.up import UpConfig, worker_device_args


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
