"""benchmarks/step_profile.py: its --smoke mode runs the prefill, decode and mixed steps on the CPU
with a tiny Llama and writes its JSON; the formats' options reach the engine (fp8 weights and an
fp8 KV cache, the decode table alone)."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_step_profile_smoke(tmp_path: Path) -> None:
    report, stdout = run_bench("step_profile.py", "--smoke", out=tmp_path / "steps.json", env=ENV)
    assert report["gpu"] == "cpu" and report["kv_cache_tensor_dtype"] != "torch.float8_e4m3fn"
    for part in ("prefill", "decode", "mixed"):
        assert report[part]["wall_ms"] > 0 and report[part]["kernels"], part
    assert report["decode"]["batch"] == 4 and report["decode"]["tokens_per_s"] > 0
    assert "decode steps, batch 4" in stdout


def test_step_profile_fp8_decode_only(tmp_path: Path) -> None:
    report, stdout = run_bench(
        "step_profile.py",
        "--smoke",
        "--quantization",
        "fp8",
        "--kv-cache-dtype",
        "fp8",
        "--decode-only",
        out=tmp_path / "steps.json",
        env=ENV,
    )
    assert report["quantization"] == "fp8" and report["kv_cache_tensor_dtype"] == "torch.float8_e4m3fn"
    assert "prefill" not in report and "mixed" not in report
    assert report["decode"]["wall_ms"] > 0 and "prefill step" not in stdout
