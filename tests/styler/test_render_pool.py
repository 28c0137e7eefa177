"""The render processes: killed and replaced, never outliving the styler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.styler.render_pool import RenderLimits, RenderPool

from .helpers import REPO


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our own child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_process_killed_while_idle_is_replaced() -> None:
    pool = RenderPool(RenderLimits(timeout_s=10, max_output_chars=1000, num_processes=1))
    try:
        assert pool.render("{{ x }}", {"x": "a"}) == "a"
        (process,) = pool._idle
        os.kill(process.proc.pid, signal.SIGKILL)
        assert _wait_gone(process.proc.pid, 10)
        assert pool.render("{{ x }}", {"x": "b"}) == "b"
    finally:
        pool.close()


def test_render_processes_exit_with_the_styler() -> None:
    """A styler killed with SIGKILL (mid-render here) leaves no render process behind."""
    code = (
        "import sys, threading\n"
        "from services.styler.render_pool import RenderLimits, RenderPool\n"
        "pool = RenderPool(RenderLimits(timeout_s=600, max_output_chars=1000, num_processes=1))\n"
        "pool.render('ready', {})\n"
        "print(pool._idle[0].proc.pid, flush=True)\n"
        "loop = '{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}'\n"
        "pool.render(loop, {})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    styler = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, cwd=REPO)
    assert styler.stdout is not None
    child = int(styler.stdout.readline())
    # Wait until the child is busy rendering (its CPU time grows), then kill the styler.
    start = _cpu_ticks(child)
    deadline = time.monotonic() + 30
    while _cpu_ticks(child) < start + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    styler.kill()
    styler.wait()
    assert _wait_gone(child, 15), "the render process outlived the styler"
