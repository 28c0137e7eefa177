"""benchmarks/host_inputs_bench.py runs (a few calls): every row times both ways of making the same
inputs (each row's two ways are checked equal inside `run`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

host_inputs_bench = pytest.importorskip("host_inputs_bench")


def test_every_row_is_timed_both_ways() -> None:
    rows = host_inputs_bench.run(calls=2, repeats=1)
    assert {r["what"] for r in rows} == {"int64 list -> tensor", "block table", "slots"}
    assert all(r["before_us"] > 0 and r["after_us"] > 0 for r in rows)
