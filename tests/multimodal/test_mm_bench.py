"""benchmarks/mm_bench.py --smoke runs every section on the CPU (a tiny Qwen2.5-VL shape, dummy
weights) and writes its JSON; the GPU run uses the Qwen2.5-VL-7B shape."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench

REPO = Path(__file__).resolve().parents[2]


def test_mm_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mm.json"
    report, _ = run_bench("mm_bench.py", "--smoke", out=out)
    rows = {(r["kind"], r["name"]): r for r in report["rows"]}
    for size, tokens in (("112x112", 16), ("224x224", 64), ("280x168", 60)):
        row = rows[("encoder", size)]
        assert row["value"] > 0 and row["tokens"] == tokens and row["unit"] == "images/s"
    ttft = [r for r in report["rows"] if r["kind"] == "ttft"]
    assert len(ttft) == 2 and all(r["value"] > 0 for r in ttft)
    assert ttft[0]["tokens"] == ttft[1]["tokens"] == 116  # 100 text + 16 image tokens, and as many text
    decode = [r for r in report["rows"] if r["kind"] == "decode"]
    assert len(decode) == 2 and all(r["value"] > 0 for r in decode)
