"""The README documents what users rely on: every metric name, every CLI command, the sections."""

from __future__ import annotations

from pathlib import Path

from services.common import metrics
from tandem.cli import SUBCOMMANDS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_metric_is_documented() -> None:
    missing = [spec.name for spec in metrics.METRICS if f"`{spec.name}`" not in README]
    assert not missing, f"metrics missing from the README: {missing}"


def test_every_command_is_documented() -> None:
    for name in SUBCOMMANDS:
        assert f"`tandem {name}`" in README


def test_sections() -> None:
    for heading in ("## Quick start", "## Using the API", "## Deploy", "## Operations", "## GPU"):
        assert heading in README
