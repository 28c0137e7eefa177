"""benchmarks/beam_bench.py runs (its --smoke mode: CPU, a tiny Llama) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_beam_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "beam.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "beam_bench.py"),
            "--smoke",
            "--phases",
            "--async-scheduling",
            "on",  # (the CPU's default is off): beam steps launched ahead
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "beam/sample" in proc.stdout and "wait+read" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["width"], r["mode"]) for r in rows} == {(4, "beam"), (4, "sample"), (8, "beam"), (8, "sample")}
    for r in rows:
        assert r["tokens"] == r["prompts"] * r["width"] * r["max_tokens"] and r["tok_per_s_per_seq"] > 0
        assert (r["ratio_to_sampling"] is not None) == (r["mode"] == "beam")
        # beam rows launched ahead (all but those of each request's first two steps and its last)
        assert (r["ahead"] is not None and r["ahead"] > 0) == (r["mode"] == "beam")
        # --phases: where each mode's step time goes (the beam step runs in apply)
        phases = r["phases_us_per_step"]
        assert {"step", "schedule", "launch", "wait+read", "apply", "forward", "host", "update"} <= set(
            phases
        )
        assert phases["step"] >= phases["apply"] > 0 and phases["step"] >= phases["launch"] > 0
        assert phases["launch"] >= phases["forward"] > 0 and phases["host"] > 0
        # the beam-specific parts of a step are timed on their own
        assert ("select" in phases and "ahead" in phases) == (r["mode"] == "beam")


def test_beam_bench_host_proxy(tmp_path: Path) -> None:
    """--host: the CPU proxy of a step's host work (8 prompts, steps ahead), beam host over sampling's."""
    out = tmp_path / "beam.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "beam_bench.py"), "--host", "--widths", "4"]
    proc = subprocess.run(
        [*cmd, "--phases", "--repeat", "1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "host-topk" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["prompts"], r["width"], r["mode"]) for r in rows} == {(8, 4, "beam"), (8, 4, "sample")}
    beam = next(r for r in rows if r["mode"] == "beam")
    assert beam["ahead"] > 0.9  # (all but each request's first two steps and its last)
    assert all(r["phases_us_per_step"]["host"] > 0 for r in rows)


def test_beam_profile_smoke() -> None:
    """benchmarks/beam_profile.py (its --smoke mode: CPU, a tiny Llama) profiles both modes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "beam_profile.py"), "--smoke", "--top", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for mode in ("beam", "sample"):
        assert f"W=4 {mode}:" in proc.stdout
    assert proc.stdout.count("per step: host") == 2
