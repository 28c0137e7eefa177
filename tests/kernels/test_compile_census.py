"""benchmarks/compile_census.py: its --smoke mode serves every wave on the CPU and writes its
JSON, and its census finds the Triton kernels of the loaded `kernels.*` modules (the GPU run
counts their compiled variants per wave)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.bench_testlib import REPO, run_bench


def test_compile_census_smoke(tmp_path: Path) -> None:
    report, stdout = run_bench(
        "compile_census.py", "--smoke", out=tmp_path / "census.json", env={"OMP_NUM_THREADS": "1"}
    )
    assert report["device"] == "cpu" and report["model"] == "tiny-llama"
    waves = report["waves"]
    assert len(waves) == 13 and all(w["seconds"] > 0 and w["prompts"] >= 1 for w in waves)
    # nothing compiles on the CPU (no Triton there): the census is empty, not wrong
    assert report["at_start"] == {} and all(w["compiled"] == {} for w in waves)
    assert report["compiled_again"] == [] and "still compiled: 0" in stdout


def test_the_census_finds_the_loaded_triton_kernels() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compile_census

    import kernels.triton.row_topk  # noqa: F401  (a module of plain @triton.jit kernels)

    found = compile_census.triton_kernels()
    assert {"triton.row_topk._topk_chunks_kernel", "triton.row_topk._topk_merge_kernel"} <= set(found)
    # (here Triton's interpreter's functions: CI runs the kernels on it)
    assert all(type(fn).__name__ in ("JITFunction", "InterpretedFunction") for fn in found.values())
