"""The engine under test: `--target HOST:PORT`, or a `tandem worker` process on stories260K."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.server import wait_for_serving

REPO = Path(__file__).resolve().parents[2]


def worker_args(model: Path, address: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--address",
        address,
        "--kv-cache-memory",
        "16MiB",
        "--max-model-len",
        "256",
        "--device",
        "cpu",
        "--cpu-threads",
        "1",
    ]


@pytest.fixture(scope="session")
def own_worker(request: pytest.FixtureRequest) -> bool:
    """True when the suite drives the tandem worker it started (tandem-specific checks run)."""
    return request.config.getoption("--target") is None


@pytest.fixture(scope="session")
def address(
    request: pytest.FixtureRequest, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    target = request.config.getoption("--target")
    if target is not None:
        yield str(target)
        return
    sock = tmp_path_factory.mktemp("worker") / "w.sock"
    addr = f"unix:{sock}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tandem.cli", "worker", *worker_args(stories_dir, addr)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=60))
        yield addr
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="session")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch
