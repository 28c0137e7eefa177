"""benchmarks/mm_serving_bench.py --smoke: both modes (in-worker encoding, `--encode-workers 1`)
serve a mixed image / text load through `tandem up` on the CPU (a tiny Qwen2.5-VL shape, dummy
weights), and the JSON has both, with the images encoded where each mode says."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_testlib import run_bench

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two `tandem up` starts: ~30 s on a loaded 2-core machine


def test_mm_serving_bench_smoke(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "mm_serving.json"
    report, _ = run_bench("mm_serving_bench.py", "--smoke", out=out, env={"TANDEM_SHARED": str(shared_dir)})
    assert report["smoke"] and report["image_tokens"] == 16  # 112 x 112: 4 x 4 merged patches
    assert set(report["modes"]) == {"in-worker", "encode-role"}
    for mode in report["modes"].values():
        [point] = mode["points"]
        assert point["concurrency"] == 2 and point["num_failed"] == 0
        assert point["image"]["completed"] == point["text"]["completed"] == 3
        assert point["output_tok_per_s"] > 0 and point["req_per_s"] > 0
        for kind in ("image", "text"):
            assert point[kind]["ttft_p50_ms"] > 0 and point[kind]["itl_p50_ms"] > 0
        # the text-only prompts are about as long as the image ones
        assert abs(point["image"]["mean_prompt_tokens"] - point["text"]["mean_prompt_tokens"]) <= 8
    # 2 warm-up + 3 measured image requests, each a new image, encoded where the mode says
    in_worker = report["modes"]["in-worker"]["encoder_counters"]
    assert in_worker == {"worker-0": {"images_encoded": 5, "encoder_cache_hits": 0}}
    encode_role = report["modes"]["encode-role"]["encoder_counters"]
    assert encode_role["encode-worker-0"]["images_encoded"] == 5
    assert encode_role["worker-0"]["images_encoded"] == 0
    [ratio] = report["encode_role_over_in_worker"]
    assert ratio["concurrency"] == 2 and ratio["output_tok_per_s"] > 0
