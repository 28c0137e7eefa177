"""Run a benchmark script as a user runs it (`python benchmarks/NAME.py ...` from the repo root, in
a process of its own) and read the JSON report it wrote: the benchmarks' smoke tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_bench(
    script: str, *args: str, out: Path | None = None, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    """benchmarks/`script` with `args` (and `--out out` when given) under this environment plus
    `env`; fails with the end of its stderr unless it exits 0. Returns (the JSON report at `out`,
    or None without one; its stdout)."""
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    if out is not None:
        command += ["--out", str(out)]
    proc = subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (json.loads(out.read_text()) if out is not None else None), proc.stdout
