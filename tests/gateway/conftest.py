"""Gateway test fixtures: real stacks shared by the whole session, one on stories260K and one on
a tiny Qwen3 (the real Qwen3 tokenizer and chat template: tools, reasoning), for the modules that
only send requests to them. Each stores Responses in its run directory."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_stack import Stack


def _start(run_dir: Path, model: Path) -> Iterator[Stack]:
    stack = Stack(run_dir, model, gateway_args=["--responses-db", str(run_dir / "responses.sqlite3")])
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def stories_stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _start(tmp_path_factory.mktemp("stack"), stories_dir)


@pytest.fixture(scope="session")
def qwen3_stack(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _start(tmp_path_factory.mktemp("qwen3-stack"), tiny_qwen3_dir)
