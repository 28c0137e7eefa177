"""benchmarks/mux_pack_bench.py: one engine step's chunks for S sessions through the real worker and
gateway GenerateMux code, packed and not; the packed message is the smaller one."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench


def test_mux_pack_bench_times_every_form_and_size(tmp_path: Path) -> None:
    out = tmp_path / "mux_pack.json"
    report, stdout = run_bench("mux_pack_bench.py", "--calls", "3", "--repeats", "1", out=out)
    rows = report["rows"]
    assert [(r["sessions"], r["form"]) for r in rows] == [
        (s, form) for s in (1, 8, 64) for form in ("before", "answers", "packed")
    ]
    for r in rows:
        assert r["worker_us_per_step"] > 0 and r["gateway_us_per_step"] > 0, r
    by = {(r["sessions"], r["form"]): r for r in rows}
    assert (
        by[64, "packed"]["message_bytes"]
        < by[64, "answers"]["message_bytes"]
        == by[64, "before"]["message_bytes"]
    )
    assert "us/session" in stdout
