"""Kill -9 each service of a `tandem up` stack in turn under a steady streaming load: the stack
recovers by itself, requests caught by a crash end with a clean error (never a hung stream), and
every request started after recovery succeeds."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.stack import UpProcess, children_by_role, http_status

from .load import Load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _child(up: UpProcess, role: str) -> int | None:
    return children_by_role(up.process.pid).get(role)


async def test_kill_each_service_under_load(stories_dir: Path) -> None:
    up = UpProcess(
        stories_dir,
        "--device", "cpu", "--worker-args", "--cpu-threads 1", "--gateway-args", "--health-interval 0.2",
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        up.wait_healthy()
        load = Load(up.url)
        load.start()
        await load.served(since=0.0)  # the load runs before the first kill
        windows: dict[str, tuple[float, float]] = {}  # role -> (recovered, steady load over)
        for role in ("styler", "worker", "gateway"):
            old = _child(up, role)
            assert old is not None
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            while True:  # the supervisor restarts it and the gateway takes it back
                new = _child(up, role)
                if new not in (None, old) and await asyncio.to_thread(http_status, up.url + "/health") == 200:
                    break
                assert time.monotonic() - killed < 90, f"{role} did not recover:\n{up.output()[-3000:]}"
                await asyncio.sleep(0.1)
            recovered = time.monotonic()
            await load.served(since=recovered, count=20)  # steady load on the recovered stack
            windows[role] = (recovered, time.monotonic())
        await load.stop()
    finally:
        status = up.stop()
    assert status == 0, up.output()[-3000:]

    kinds = [o.kind for o in load.outcomes]
    assert "hung" not in kinds, [o for o in load.outcomes if o.kind == "hung"]
    for role, (recovered, over) in windows.items():
        later = [o for o in load.outcomes if recovered <= o.started and o.ended <= over]
        assert later and all(o.kind == "ok" for o in later), (role, [o for o in later if o.kind != "ok"])
    print(
        f"\n{len(kinds)} streams: {kinds.count('ok')} ok, {kinds.count('error')} clean errors, 0 hung; "
        f"errors: {sorted({o.detail for o in load.outcomes if o.kind == 'error'})}"
    )
    output = up.output()
    for role in ("styler", "worker-0", "gateway"):
        assert f"{role} was killed by SIGKILL; restarting" in output
