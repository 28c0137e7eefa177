"""benchmarks/serving_bench.py's closed-loop rate while full (`steady_tok_per_s`: the output
tokens between the first request's end and the last request's start, over that window) and its
repeated points (`median_run`), and the split of the mean TTFT at the worker's door (`worker_split`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

serving_bench = pytest.importorskip("serving_bench")
Result = serving_bench.Result


def _request(start: float, chunk_times: list[float], tokens_per_chunk: int = 1) -> object:
    first, *rest = chunk_times
    itls = [b - a for a, b in zip(chunk_times, rest, strict=False)]
    return Result(
        ok=True,
        start=start,
        ttft=first - start,
        itls=itls,
        num_chunks=len(chunk_times),
        tokens=tokens_per_chunk * len(chunk_times),
    )


def test_two_slots_each_at_one_token_a_second_give_two() -> None:
    # a closed loop of 2 slots, each request 4 tokens a second apart; the window is [4, 6)
    results = [
        _request(0.0, [1.0, 2.0, 3.0, 4.0]),
        _request(2.0, [3.0, 4.0, 5.0, 6.0]),
        _request(4.0, [5.0, 6.0, 7.0, 8.0]),
        _request(6.0, [7.0, 8.0, 9.0, 10.0]),
    ]
    assert serving_bench.steady_tok_per_s(results) == pytest.approx(2.0)
    # chunks of 3 tokens count 3 each
    triple = [_request(r.start, [r.start + r.ttft + sum(r.itls[:i]) for i in range(4)], 3) for r in results]
    assert serving_bench.steady_tok_per_s(triple) == pytest.approx(6.0)


def test_a_run_that_never_fills_has_no_steady_rate() -> None:
    # every request starts before the first one ends: no window where the loop is full and fed
    results = [_request(0.0, [1.0, 2.0]), _request(0.0, [1.5, 2.5])]
    assert serving_bench.steady_tok_per_s(results) is None
    assert serving_bench.steady_tok_per_s(results[:1]) is None
    failed = Result(ok=False, start=5.0)
    assert serving_bench.steady_tok_per_s([*results, failed]) is None


def test_repeated_runs_report_the_median_one_with_every_rate() -> None:
    runs = [
        {"output_tok_per_s": 90.0, "steady_tok_per_s": 95.0, "ttft_p50_ms": 9.0},
        {"output_tok_per_s": 110.0, "steady_tok_per_s": 111.0, "ttft_p50_ms": 7.0},
        {"output_tok_per_s": 100.0, "steady_tok_per_s": None, "ttft_p50_ms": 8.0},
    ]
    point = serving_bench.median_run(runs)
    assert point["output_tok_per_s"] == 100.0 and point["ttft_p50_ms"] == 8.0  # one run's figures, whole
    assert point["repeats_tok_per_s"] == [90.0, 110.0, 100.0]
    assert point["repeats_steady_tok_per_s"] == [95.0, 111.0, None]
    assert serving_bench.median_run(runs[:2])["output_tok_per_s"] == 90.0  # the lower middle
    assert "repeats_tok_per_s" not in serving_bench.median_run(runs[:1])


def test_burst_ttfts_split_the_first_wave_from_the_rest() -> None:
    # two slots: the first two requests start together (the burst), the next two as slots free
    results = [
        _request(0.0, [0.5, 1.0]),
        _request(0.0, [0.9, 1.2]),
        _request(1.0, [1.1, 1.5]),
        _request(1.2, [1.3, 1.6]),
    ]
    burst, after = serving_bench.burst_ttfts(results, 2)
    assert burst == pytest.approx([0.5, 0.9]) and after == pytest.approx([0.1, 0.1])
    point = serving_bench.summarize(results, 2.0, closed_loop=True, concurrency=2)
    assert point["ttft_burst_p50_ms"] == pytest.approx(900.0)  # (pct: the upper of two)
    assert point["ttft_after_p50_ms"] == pytest.approx(100.0)
    assert serving_bench.summarize(results, 2.0)["ttft_burst_p50_ms"] is None


def test_worker_split_takes_the_point_from_the_histograms_and_the_client() -> None:
    text = "\n".join(
        [
            "# TYPE tandem:request_queue_seconds histogram",
            'tandem:request_queue_seconds_bucket{le="0.1"} 3.0',
            "tandem:request_queue_seconds_sum 0.5",
            "tandem:request_queue_seconds_count 5.0",
            "tandem:time_to_first_token_seconds_sum 1.0",
            "tandem:time_to_first_token_seconds_count 5.0",
            "tandem:e2e_request_latency_seconds_sum 9.0",
        ]
    )
    before = serving_bench.histogram_sums(text)
    assert before == {"queue_sum": 0.5, "queue_count": 5.0, "ttft_sum": 1.0, "ttft_count": 5.0}
    # two requests over the point: queued 0.1 s and 0.3 s, first tokens 0.2 s and 0.4 s after arrival
    after = {"queue_sum": 0.9, "queue_count": 7.0, "ttft_sum": 1.6, "ttft_count": 7.0}
    results = [_request(0.0, [0.25, 0.5]), _request(0.0, [0.55, 0.6])]  # the client's TTFT: 0.25, 0.55
    split = serving_bench.worker_split(before, after, results)
    assert split == pytest.approx(
        {"queue": 200.0, "ttft": 300.0, "client_ttft": 400.0, "outside": 100.0, "client_ttft_p50": 400.0}
    )
    assert serving_bench.worker_split({}, {}, results) == {}  # no worker metrics: nothing claimed
    # the worker's gaps between tokens beside the client's between chunks: 0.25 and 0.05 s
    after_itl = after | {"itl_sum": 0.2, "itl_count": 4.0}
    split = serving_bench.worker_split(before, after_itl, results)
    assert split["itl"] == pytest.approx(50.0)
    assert split["client_itl"] == pytest.approx(150.0)


def test_gc_split_reads_the_worker_s_collections_by_generation() -> None:
    text = "\n".join(
        [
            "# TYPE tandem:gc_pause_seconds histogram",
            'tandem:gc_pause_seconds_bucket{generation="0",le="0.001"} 40.0',
            'tandem:gc_pause_seconds_sum{generation="0"} 0.004',
            'tandem:gc_pause_seconds_count{generation="0"} 40.0',
            'tandem:gc_pause_seconds_sum{generation="2"} 0.05',
            'tandem:gc_pause_seconds_count{generation="2"} 1.0',
        ]
    )
    before = serving_bench.histogram_sums(text)
    assert before == {"gc0_sum": 0.004, "gc0_count": 40.0, "gc2_sum": 0.05, "gc2_count": 1.0}
    after = before | {"gc0_sum": 0.006, "gc0_count": 50.0, "gc2_sum": 0.08, "gc2_count": 2.0}
    assert serving_bench.gc_split(before, after) == {"gen0": [10, 2.0], "gen2": [1, 30.0]}
    assert serving_bench.gc_split(after, after) == {}  # nothing collected over the point
