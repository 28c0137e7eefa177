"""benchmarks/lora_bench.py --smoke runs every scenario on the CPU with a tiny model and writes its JSON
(with the mixed row again under another LoRA kernel config and with the shrinks' side stream off,
as the GPU A/B runs them)."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench


def test_lora_bench_smoke(tmp_path: Path) -> None:
    report, _ = run_bench(
        "lora_bench.py",
        "--smoke",
        "--kernel-configs",
        "k_chunk=256,expand_columns=256",
        "--overlap-ab",
        out=tmp_path / "lora.json",
    )
    assert [r["batch"] for r in report["rows"]] == [1, 1, 1, 4, 4, 4, 4, 4]
    assert report["rows"][-2]["kernel_config"] == "k_chunk=256,expand_columns=256,num_warps=4"
    assert report["rows"][-1]["scenario"] == "batch 4, 2 adapters [TANDEM_LORA_OVERLAP=0]"
    assert report["kernel_config"] == "k_chunk=1024,expand_columns=512,num_warps=4"
    assert all(r["tok_per_s"] > 0 for r in report["rows"])
    assert set(report["targets"]) == {
        "batch1_adapter_vs_base",
        "batch4_mixed_vs_base",
        "batch1_base_lora_on_vs_off",
        "batch4_base_lora_on_vs_off",
        "batch4_mixed_vs_base [k_chunk=256,expand_columns=256,num_warps=4]",
        "batch4_mixed_vs_base [TANDEM_LORA_OVERLAP=0]",
    }


def test_lora_kernel_bench_smoke(tmp_path: Path) -> None:
    """benchmarks/lora_kernel_bench.py --smoke runs a config A/B on the Triton interpreter (checked
    against the reference twins, not timed) and writes its JSON."""
    report, _ = run_bench(
        "lora_kernel_bench.py",
        "--smoke",
        "--configs",
        "default k_chunk=32,expand_columns=256",
        out=tmp_path / "lora_kernels.json",
        env={"TRITON_INTERPRET": "1"},
    )
    assert [(r["rows"], r["config"]) for r in report["rows"]] == [
        (12, "k_chunk=512,expand_columns=128,num_warps=4"),
        (12, "k_chunk=32,expand_columns=256,num_warps=4"),
    ]
    assert set(report["rows"][0]["us_per_layer"]) == {"qkv", "o", "gate_up", "down"}
