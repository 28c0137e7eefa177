"""benchmarks/spec_bench.py --smoke runs every workload on the CPU and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_spec_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "spec_bench.py"), "--smoke", "--out", str(out)],
        check=True,
        cwd=REPO,
        timeout=300,
    )
    report = json.loads(out.read_text())
    rows = {(r["name"], r["k"], r["adaptive"]): r for r in report["rows"]}
    assert rows[("baseline", 0, False)]["speedup"] == 1.0
    assert report["speculative_cuda_graphs"] is True
    for k in (2, 4):
        # free proposals of the target's own output, and the target as its own draft: all kept
        assert rows[("oracle (always agrees, free)", k, False)]["acceptance_rate"] == 1.0
        assert rows[("draft=target", k, False)]["acceptance_rate"] == 1.0
        assert rows[("never-agreeing draft", k, False)]["acceptance_rate"] < 0.2
        assert rows[("prompt lookup (grounded)", k, False)]["tokens_per_s"] > 0
        # EAGLE: the baseline's tokens through a real head's forwards are all kept; a random head's ~never
        assert rows[("eagle3 head, oracle tokens", k, False)]["acceptance_rate"] == 1.0
        assert rows[("eagle3 random head", k, False)]["acceptance_rate"] < 0.2
        assert rows[("eagle1 random head", k, False)]["acceptance_rate"] < 0.2
    assert ("never-agreeing draft", 4, True) in rows
    assert ("eagle3 random head", 4, True) in rows and ("eagle1 random head", 4, True) in rows
    assert set(report["targets"]) >= {
        "full_agreement_k4_speedup",
        "zero_agreement_adaptive_speedup",
        "eagle3_full_agreement_k4_speedup",
        "eagle3_zero_agreement_adaptive_speedup",
    }
