"""Reliability fixtures: one limited real stack (stories260K on CPU) shared by the module tests
that only read from it (overload, limits, fuzz, hostile templates)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .rstack import LIMIT_ARGS, ReliabilityStack


@pytest.fixture(scope="session")
def limited_stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReliabilityStack]:
    stack = ReliabilityStack(
        tmp_path_factory.mktemp("limited"),
        stories_dir,
        gateway_args=LIMIT_ARGS,
        styler_args=["--render-timeout", "1", "--max-prompt-chars", "200000"],
    )
    try:
        yield stack.start()
    finally:
        stack.stop()
