"""Gateway test fixtures: one real stories260K stack shared by the whole gateway session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_stack import Stack


@pytest.fixture(scope="session")
def stories_stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("stack"), stories_dir)
    try:
        yield stack.start()
    finally:
        stack.stop()
