"""Sampling processes with py-spy for the benchmarks (serving_bench.py --py-spy, kv_transfer_bench.py
--py-spy): the executable, one `py-spy record` per process, and stopping them so they write their
files. `spy_top.py` summarizes what they wrote."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path


def find_py_spy() -> str:
    """The py-spy executable: on PATH, or beside this Python (a venv's bin that is not on PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else "")
    if not found:
        raise SystemExit("--py-spy: no py-spy executable on PATH or beside this Python (pip install py-spy)")
    return found


def record(
    exe: str, pid: int, path: Path, rate: int, native: bool = False, gil: bool = False
) -> subprocess.Popen[bytes]:
    """Sample `pid` at `rate` Hz into `path` (collapsed stacks per thread, `--format raw`) until
    `stop`. `native`: C / Cython frames too (grpc's core, torch's dispatch); py-spy then pauses the
    process for each sample (it cannot unwind native stacks without stopping the threads). `gil`:
    only the thread holding the GIL at each sample (`--gil`): each thread's share of the samples is
    its share of the GIL, and the samples against rate x seconds say how long no thread held it."""
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path)]
    cmd += ["--threads", "--native"] if native else ["--threads", "--nonblocking"]
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
