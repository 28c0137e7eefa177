"""benchmarks/engine_bench.py --smoke with `--quantization`: the quantized Llama-3.1-8B rows are
run beside the bf16 ones and carry their ratio to them (the issue-19 targets' inputs), and the
quantized decode row the quantized GEMM tuner's fused-variant decisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.engine_bench import main


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_smoke_with_quantization(quantization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.ops import QuantFusion
    from kernels.triton import quant_gemm as qg

    # (the CPU tunes nothing: one decision as the tuner records it on a GPU)
    config = qg.WORDS_CANDIDATES[8][0]
    decision = qg.FusedDecision("quant p", 1, config, 2e-5, 3e-5, config, 1e-5, "unfused", "auto")
    monkeypatch.setattr(qg, "_FUSED_DECISIONS", {(1, QuantFusion(gated=True)): decision})
    out = tmp_path / "engine.json"
    args = ["--smoke", "--models", "Llama-3.1-8B", "--skip-hf", "--skip-variants"]
    assert main([*args, "--quantization", quantization, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["rows"] if r["model"] == "Llama-3.1-8B"}
    label = f" {quantization} weights"
    decode = rows[f"1 batch-1 decode{label}"]
    assert decode["metrics"]["tok_per_s"] > 0
    # x_bf16: tokens/s over the bf16 row of the same run; MBU against the quantized bytes
    bf16 = rows["1 batch-1 decode"]["metrics"]
    assert decode["metrics"]["x_bf16"] == pytest.approx(decode["metrics"]["tok_per_s"] / bf16["tok_per_s"])
    assert decode["metrics"]["bytes_per_step_GB"] != bf16["bytes_per_step_GB"]
    assert decode["target"].startswith(">= 1.7x bf16")
    assert any(s.startswith("5 prefill") and s.endswith(label) for s in rows)
    assert any(s.startswith("2 offline") and s.endswith(f"{label} kv fp8") for s in rows)
    assert f"Llama-3.1-8B{label}" in report["linear_tuning"]
    assert decode["fused_gemms"] == [decision.summary()] and not rows["1 batch-1 decode"]["fused_gemms"]
