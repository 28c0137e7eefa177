"""Code comments say why, not what a benchmark measured: no timings, throughputs or GPU names in
the source of kernels/, services/, gateway/ or tandem/. Figures belong in docs/gpu.md ("Figures
formerly in code comments"), where a date and a round go with them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "services", "gateway", "tandem")
FIGURE = re.compile(r"[0-9] ?(ms|us|µs|tok/s|GB/s)\b|H100|H200")


def figures(root: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.relative_to(root).parts[:2] == ("tandem", "v1"):  # generated
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FIGURE.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_benchmark_figures_in_the_source() -> None:
    found = figures(REPO)
    assert not found, "move these figures to docs/gpu.md, keep the reason:\n" + "\n".join(found)


def test_the_scan_sees_a_figure(tmp_path: Path) -> None:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("X = 1  # 4.37 -> 4.31 ms/token on an H200\n")
    assert figures(tmp_path) == ["kernels/k.py:1: X = 1  # 4.37 -> 4.31 ms/token on an H200"]
