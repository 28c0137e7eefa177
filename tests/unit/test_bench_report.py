"""benchmarks/bench_report.py: the report's header, where it goes, and its copy under $OUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_report import write_report


def test_report_goes_to_out_and_a_copy_to_the_out_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected = tmp_path / "collected"
    monkeypatch.setenv("OUT", str(collected))
    path = write_report(
        "spec", "NVIDIA H100 80GB HBM3", False, str(tmp_path / "run" / "spec.json"), {"rows": [1, 2]}
    )
    assert path == tmp_path / "run" / "spec.json"
    report = json.loads(path.read_text())
    assert (
        report["device"] == "NVIDIA H100 80GB HBM3" and report["smoke"] is False and report["rows"] == [1, 2]
    )
    assert (collected / "spec.json").read_text() == path.read_text()


def test_report_already_under_out_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    path = write_report("quant", "cpu (x86_64)", True, str(tmp_path / "quant.json"), {"gemv": []})
    assert [p.name for p in tmp_path.iterdir()] == ["quant.json"]
    assert json.loads(path.read_text())["gemv"] == []


def test_smoke_report_without_out_goes_to_a_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    path = write_report("mm", "cpu (x86_64)", True, "", {})
    try:
        assert path.name.startswith("mm_cpu--x86-64") and "benchmarks" not in path.parts
    finally:
        path.unlink()
