"""benchmarks/grpc_rtt_bench.py: a grpc.aio server process and a client time a unary-stream call's
first message, over TCP and a unix socket, with and without idle pauses between calls."""

from __future__ import annotations

from pathlib import Path

from tests.bench_testlib import run_bench


def test_grpc_rtt_bench_times_both_transports(tmp_path: Path) -> None:
    out = tmp_path / "rtt.json"
    report, stdout = run_bench("grpc_rtt_bench.py", "--calls", "5", "--idle-ms", "0,2", out=out)
    rows = report["rows"]
    assert [(r["transport"], r["idle_ms"]) for r in rows] == [
        ("tcp", 0.0),
        ("tcp", 2.0),
        ("unix", 0.0),
        ("unix", 2.0),
    ]
    for r in rows:
        assert r["calls"] == 5 and 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"], r
    assert "first message p50" in stdout
