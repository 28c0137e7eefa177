"""benchmarks/grpc_ceiling_bench.py runs as a user runs it and reports the bytes it moved."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench


def test_grpc_ceiling_bench_reports_each_layout(tmp_path: Path) -> None:
    report, stdout = run_bench(
        "grpc_ceiling_bench.py",
        "--connections", "2",
        "--servers", "1",
        "--message-bytes", str(1 << 16),
        "--total-bytes", str(1 << 20),
        "--repeats", "1",
        "--malloc", "default",
        out=tmp_path / "ceiling.json",
    )  # fmt: skip
    points = {(p["channel_options"], p["layout"], p["connections"]): p for p in report["points"]}
    assert set(points) == {
        (o, layout, 2) for o in ("default", "large-frames") for layout in ("thread", "proc")
    }
    assert all(p["gb_per_s"] > 0 and len(p["samples"]) == 1 for p in points.values())
    assert "thread x2" in stdout
