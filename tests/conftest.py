"""Shared test fixtures: where the shared data lives, and a clean offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TANDEM_SHARED", REPO_ROOT.parent / "shared")).resolve()
STORIES_DIR = SHARED / "models" / "stories260K"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set TANDEM_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def stories_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260K"


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/protocols: run the conformance suite against another engine instead of a tandem worker
    parser.addoption(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="tests/protocols: the engine to drive (default: start a tandem worker on stories260K)",
    )
