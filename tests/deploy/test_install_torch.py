"""scripts/install_torch.sh picks the torch build by the machine: the CPU index first without an
NVIDIA driver (the default index's wheel is the CUDA build), the default index otherwise or as
the fallback. A stand-in `python` records the pip calls (nothing is installed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install_torch.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# No torch; every pip call is logged; a call naming --index-url fails when CPU_INDEX_FAILS is set
# (the CPU index unreachable).
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then exit 1; fi
echo "$*" >> "$PIP_LOG"
case "$*" in *--index-url*) [ -n "$CPU_INDEX_FAILS" ] && exit 1;; esac
exit 0
"""


def _run(tmp_path: Path, with_driver: bool, cpu_index_fails: bool) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if with_driver:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PIP_LOG": str(log),
        "CPU_INDEX_FAILS": "1" if cpu_index_fails else "",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), str(python)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def no_driver_here() -> None:
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("this machine has an NVIDIA driver")


@pytest.mark.usefixtures("no_driver_here")
def test_without_a_driver_the_cpu_build_comes_first(tmp_path: Path) -> None:
    out, calls = _run(tmp_path, with_driver=False, cpu_index_fails=False)
    assert calls == [
        f"-m pip --disable-pip-version-check install -q --retries 1 --timeout 15 --index-url {CPU_INDEX} torch==2.13.0"
    ]
    assert "no NVIDIA driver" in out


@pytest.mark.usefixtures("no_driver_here")
def test_an_unreachable_cpu_index_falls_back_to_the_default_index(tmp_path: Path) -> None:
    out, calls = _run(tmp_path, with_driver=False, cpu_index_fails=True)
    assert len(calls) == 2 and CPU_INDEX in calls[0]
    assert calls[1] == "-m pip --disable-pip-version-check install -q torch==2.13.0"
    assert "installing it from the default index instead" in out


def test_with_a_driver_the_default_index_gives_the_cuda_build(tmp_path: Path) -> None:
    out, calls = _run(tmp_path, with_driver=True, cpu_index_fails=False)
    assert calls == ["-m pip --disable-pip-version-check install -q torch==2.13.0"]
    assert "NVIDIA driver found" in out
