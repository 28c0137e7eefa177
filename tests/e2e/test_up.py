"""`tandem up` on the real stories260K model: health, clean stop, crash handling."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.stack import UpProcess, alive, children_by_role, http_status

pytestmark = pytest.mark.e2e


def _children_by_role(up: UpProcess) -> dict[str, int]:
    return children_by_role(up.process.pid)


def test_up_serves_health_and_stops_cleanly(stories_dir: Path) -> None:
    up = UpProcess(stories_dir)
    try:
        up.wait_healthy()
        assert http_status(up.url + "/health") == 200
        children = _children_by_role(up)
        assert set(children) == {"styler", "worker", "gateway"}
        out = up.output()
        assert "tandem is serving" in out
        # the styler and the worker load side by side (neither needs the other), the gateway after
        assert out.index("starting worker-0") < out.index("styler is serving"), out[-3000:]
        assert out.index("starting gateway") > max(
            out.index("styler is serving"), out.index("worker-0 is serving")
        )
    finally:
        status = up.stop()
    assert status == 0, up.output()[-3000:]
    time.sleep(0.2)
    assert not [pid for pid in children.values() if alive(pid)], "a child outlived tandem up"


def test_up_without_model_explains_what_to_do(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "nope")
    assert up.process.wait(30) == 2
    up.stop()
    assert "Hugging Face model directory" in up.output()


def test_crashed_child_stops_the_rest_when_restarts_are_off(stories_dir: Path) -> None:
    up = UpProcess(stories_dir, "--max-restarts", "0")
    try:
        up.wait_healthy()
        children = _children_by_role(up)
        os.kill(children["worker"], signal.SIGKILL)
        assert up.process.wait(60) == 1
        assert "worker-0" in up.output() and "last log lines" in up.output()
    finally:
        up.stop()
    time.sleep(0.2)
    assert not [pid for pid in children.values() if alive(pid)], "a child outlived tandem up"


def test_crashed_child_is_restarted(stories_dir: Path) -> None:
    up = UpProcess(stories_dir)
    try:
        up.wait_healthy()
        children = _children_by_role(up)
        os.kill(children["styler"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _children_by_role(up)
            if now.get("styler") not in (None, children["styler"]) and http_status(up.url + "/health") == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("styler was not restarted:\n" + up.output()[-3000:])
        assert up.process.poll() is None
        assert "restarting" in up.output()
    finally:
        assert up.stop() == 0
