"""benchmarks/beam_bench.py runs (its --smoke mode: CPU, a tiny Llama) and writes its JSON."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import REPO, run_bench

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_beam_bench_smoke(tmp_path: Path) -> None:
    report, stdout = run_bench(
        "beam_bench.py",
        "--smoke",
        "--phases",
        "--async-scheduling",
        "on",  # (the CPU's default is off): beam steps launched ahead
        out=tmp_path / "beam.json",
        env=ENV,
    )
    assert "beam/sample" in stdout and "wait+read" in stdout
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
    report, stdout = run_bench(
        "beam_bench.py",
        "--host",
        "--widths",
        "4",
        "--phases",
        "--repeat",
        "1",
        out=tmp_path / "beam.json",
        env=ENV,
    )
    assert "host-topk" in stdout
    rows = report["rows"]
    assert {(r["prompts"], r["width"], r["mode"]) for r in rows} == {(8, 4, "beam"), (8, 4, "sample")}
    beam = next(r for r in rows if r["mode"] == "beam")
    assert beam["ahead"] > 0.9  # (all but each request's first two steps and its last)
    assert all(r["phases_us_per_step"]["host"] > 0 for r in rows)


def test_beam_profile_smoke() -> None:
    """benchmarks/beam_profile.py (its --smoke mode: CPU, a tiny Llama) profiles both modes."""
    _, stdout = run_bench("beam_profile.py", "--smoke", "--top", "3", env=ENV)
    for mode in ("beam", "sample"):
        assert f"W=4 {mode}:" in stdout
    assert stdout.count("per step: host") == 2
