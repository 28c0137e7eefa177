"""Environment switches have one home: services/common/switches.py.

No other module of kernels/, services/, gateway/ or tandem/ reads a `TANDEM_*` variable itself,
except the `TANDEM_<OPTION>` mirrors of command-line options (the config system's, and the
healthcheck reading another process's options). `tandem worker --list-switches` prints them all,
`--help` says so, and docs/worker.md has one table with exactly these switches.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from services.common import switches
from services.common.config import env_name
from services.styler.config import StylerConfig
from services.worker.config import WorkerConfig
from tandem.up import UpConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "services", "gateway", "tandem")
HOME = {REPO / "services/common/switches.py", REPO / "services/common/config.py"}


def option_env_names() -> set[str]:
    configs = (GatewayConfig, StylerConfig, WorkerConfig, UpConfig)
    return {env_name(f.name) for cls in configs for f in dataclasses.fields(cls)}


def environment_reads(path: Path) -> list[tuple[int, str]]:
    """(line, name) of each `<env>.get("TANDEM_...")`, `os.getenv("TANDEM_...")` or `<env>["TANDEM_..."]`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "getenv", "pop", "setdefault"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("TANDEM_"):
            found.append((node.lineno, key.value))
    return found


def test_no_switch_is_read_outside_its_home() -> None:
    options = option_env_names()
    stray = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path in HOME or "v1" in path.relative_to(REPO).parts[:2]:
                continue
            stray += [
                f"{path.relative_to(REPO)}:{line} {name}"
                for line, name in environment_reads(path)
                if name not in options
            ]
    assert not stray, "declare these in services/common/switches.py:\n" + "\n".join(stray)


def test_the_checker_finds_a_stray_read(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('import os\nA = os.environ.get("TANDEM_X", "1")\nB = os.environ["TANDEM_Y"]\n')
    assert environment_reads(probe) == [(2, "TANDEM_X"), (3, "TANDEM_Y")]


def test_switch_values() -> None:
    assert switches.PDL.read({}) is True
    assert switches.PDL.read({"TANDEM_PDL": ""}) is True
    assert switches.PDL.read({"TANDEM_PDL": "0"}) is False
    assert switches.PDL.read({"TANDEM_PDL": "off"}) is False
    assert switches.HEALTHCHECK_TIMEOUT.read({"TANDEM_HEALTHCHECK_TIMEOUT": "0.5"}) == 0.5
    with pytest.raises(switches.SwitchError, match="TANDEM_PDL='maybe'"):
        switches.PDL.read({"TANDEM_PDL": "maybe"})
    with pytest.raises(switches.SwitchError, match="TANDEM_HEALTHCHECK_TIMEOUT='-1'"):
        switches.HEALTHCHECK_TIMEOUT.read({"TANDEM_HEALTHCHECK_TIMEOUT": "-1"})
    assert switches.QUANT_FUSE.read({}) == "auto"
    assert switches.QUANT_FUSE.read({"TANDEM_QUANT_FUSE": " Always"}) == "always"
    with pytest.raises(switches.SwitchError, match="expected one of auto, always, never"):
        switches.QUANT_FUSE.read({"TANDEM_QUANT_FUSE": "1"})
    names = [s.name for s in switches.SWITCHES]
    assert len(names) == len(set(names)) and all(s.reason for s in switches.SWITCHES)
    assert not set(names) & option_env_names()  # a switch never shadows an option's variable


def run_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    full_env |= {"PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "worker", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_list_switches_prints_the_table() -> None:
    result = run_worker("--list-switches", TANDEM_PDL="0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["switch", "type", "default", "now"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {s.name for s in switches.SWITCHES}
    assert rows["TANDEM_PDL"][1:4] == ["bool", "1", "0"]  # default on, set off here
    assert rows["TANDEM_FOLD_NORMS"][1:4] == ["bool", "1", "1"]


def test_help_mentions_the_switches() -> None:
    result = run_worker("--help")
    assert result.returncode == 0
    assert "--list-switches" in " ".join(result.stdout.split())


def test_a_bad_switch_is_one_line_at_start_up() -> None:
    result = run_worker("--model", str(REPO / "no-such-model"), TANDEM_FOLD_NORMS="perhaps")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tandem worker: error: TANDEM_FOLD_NORMS='perhaps': expected one of 1, true, on, yes, 0, false, off, no"
    ]


def test_docs_table_lists_exactly_the_switches() -> None:
    text = (REPO / "docs/worker.md").read_text()
    section = text.split("### Environment switches", 1)[1].split("\n#", 1)[0]
    documented = re.findall(r"^\| `(TANDEM_[A-Z0-9_]+)` \|", section, flags=re.M)
    assert documented == [s.name for s in switches.SWITCHES]
