"""`--worker dns:HOST:PORT`: the router keeps one worker per address the name resolves to."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.router import Router
from services.common.server import wait_for_serving
from tests.gateway.gateway_stack import REPO, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tcp_worker(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = (tmp_path_factory.mktemp("dns") / "worker.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--model",
            str(stories_dir),
            "--address",
            f"127.0.0.1:{port}",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    yield port
    proc.terminate()
    proc.wait(30)
    log.close()


async def test_dns_name_expands_to_the_resolved_workers(tcp_worker: int) -> None:
    await wait_for_serving(f"127.0.0.1:{tcp_worker}", 60)
    router = Router([f"dns:localhost:{tcp_worker}"], poll_interval_s=0.2)
    try:
        await router.poll_once()
        addresses = {w.address for w in router.workers}
        assert f"127.0.0.1:{tcp_worker}" in addresses  # localhost may also give [::1], not listened on
        healthy = [w.address for w in router.healthy_workers()]
        assert healthy == [f"127.0.0.1:{tcp_worker}"]
        assert router.pick([1, 2, 3]).address == f"127.0.0.1:{tcp_worker}"
        # Polling again keeps the same members (no duplicates).
        await router.poll_once()
        assert sorted(w.address for w in router.workers) == sorted(addresses)
    finally:
        await router.close()


async def test_unresolvable_name_keeps_serving_nothing_and_does_not_crash() -> None:
    router = Router(["dns:no-such-host.invalid:50052"], poll_interval_s=0.2)
    try:
        await router.poll_once()
        assert router.workers == []
    finally:
        await router.close()
