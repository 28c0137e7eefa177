"""benchmarks/kv_cache_bench.py without `tandem up`: the multi-turn workload, the turn loop against a
small fake chat server (each turn carries the replies before it; conversations interleave), the
hit-rate and TTFT summary, and the /metrics deltas."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

bench = pytest.importorskip("kv_cache_bench")


def test_workload_is_deterministic_and_shares_system_prompts() -> None:
    workload = bench.make_workload(2, 5, 3, 20, 4)
    assert workload == bench.make_workload(2, 5, 3, 20, 4)
    assert workload != bench.make_workload(2, 5, 3, 20, 4, seed="other")
    assert [c.system for c in workload.conversations] == [0, 1, 0, 1, 0]
    assert len(set(workload.system_prompts)) == 2
    assert workload.num_turns == 15
    for conv in workload.conversations:
        assert len(conv.user_messages) == 3
        assert all(len(m.split()) == 4 and set(m.split()) <= set(bench.WORDS) for m in conv.user_messages)
    # distinct openings: no two system prompts share a first block by chance
    assert workload.system_prompts[0].split()[:8] != workload.system_prompts[1].split()[:8]


def test_a_turn_is_the_history_with_the_replies_and_a_new_user_message() -> None:
    workload = bench.make_workload(1, 1, 3, 8, 2)
    conv = workload.conversations[0]
    system = {"role": "system", "content": workload.system_prompts[0]}
    assert bench.turn_messages(workload, 0, []) == [
        system,
        {"role": "user", "content": conv.user_messages[0]},
    ]
    assert bench.turn_messages(workload, 0, ["r1", "r2"]) == [
        system,
        {"role": "user", "content": conv.user_messages[0]},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": conv.user_messages[1]},
        {"role": "assistant", "content": "r2"},
        {"role": "user", "content": conv.user_messages[2]},
    ]


def _turn(turn: int, prompt: int, cached: int, ttft_s: float, ok: bool = True) -> Any:
    result = bench.TurnResult(0, turn, ok=ok, ttft_s=ttft_s, prompt_tokens=prompt, cached_tokens=cached)
    if not ok:
        result.error = "HTTP 500: boom"
    return result


def test_summary_counts_hits_over_the_turns_that_succeeded() -> None:
    results = [
        _turn(1, 100, 20, 0.010),
        _turn(2, 200, 150, 0.020),
        _turn(3, 300, 250, 0.030),
        _turn(3, 400, 0, 0.0, ok=False),
    ]
    point = bench.summarize(results, 2.0)
    assert (point["num_turns"], point["num_failed"], point["errors"]) == (4, 1, ["HTTP 500: boom"])
    assert (point["prompt_tokens"], point["cached_tokens"]) == (600, 420)
    assert point["hit_rate"] == pytest.approx(420 / 600)
    assert point["hit_rate_after_first_turn"] == pytest.approx(400 / 500)
    assert point["ttft_p50_ms"] == pytest.approx(20.0)
    assert point["ttft_p99_ms"] == pytest.approx(30.0)
    assert point["longest_prompt_tokens"] == 300
    empty = bench.summarize([], 1.0)
    assert (empty["hit_rate"], empty["ttft_p50_ms"], empty["longest_prompt_tokens"]) == (0.0, 0.0, 0)


def test_metric_deltas_keep_the_named_samples() -> None:
    before = bench.parse_metrics(
        "# HELP x\n"
        'tandem:gateway_exact_routes_total{pool="worker"} 4.0\n'
        'tandem:gateway_worker_requests_total{worker="worker-0"} 2.0\n'
    )
    after = bench.parse_metrics(
        'tandem:gateway_exact_routes_total{pool="worker"} 10.0\n'
        'tandem:gateway_worker_requests_total{worker="worker-0"} 5.0\n'
        'tandem:gateway_worker_requests_total{worker="worker-1"} 3.0\n'
        "tandem:requests_running 1.0\n"
    )
    assert bench.metric_deltas(before, after, bench.GATEWAY_METRICS) == {
        'tandem:gateway_exact_routes_total{pool="worker"}': 6.0,
        'tandem:gateway_worker_requests_total{worker="worker-0"}': 3.0,
        'tandem:gateway_worker_requests_total{worker="worker-1"}': 3.0,
    }


async def _serve_and_run(workload: Any, concurrency: int) -> tuple[list[Any], list[list[dict[str, str]]]]:
    """The turn loop against a chat server that replies `reply-N` (N counts its requests) and
    reports every prompt message but the last as cached, one token per message."""
    seen: list[list[dict[str, str]]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        seen.append(body["messages"])
        await asyncio.sleep(0.001 * (len(seen) % 3))  # let the slots finish out of order
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": f"reply-{len(seen)}"}}]},
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": len(body["messages"]),
                    "completion_tokens": 1,
                    "prompt_tokens_details": {"cached_tokens": len(body["messages"]) - 1},
                },
            },
        ]
        for chunk in chunks:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        results, _ = await bench.run_conversations(url, "m", workload, concurrency, 4)
    finally:
        await server.close()
    return results, seen


def test_turns_carry_the_actual_replies_and_interleave() -> None:
    workload = bench.make_workload(2, 3, 3, 8, 2)
    results, seen = asyncio.run(_serve_and_run(workload, concurrency=2))
    assert len(results) == len(seen) == 9 and all(r.ok for r in results)
    # every turn of a conversation repeats the replies it got before, in order
    for c, conv in enumerate(workload.conversations):
        mine = [m for m in seen if m[1]["content"] == conv.user_messages[0]]
        assert [len(m) for m in mine] == [2, 4, 6]
        replies = [r.reply for r in sorted((r for r in results if r.conversation == c), key=lambda r: r.turn)]
        assert mine[-1][2]["content"] == replies[0] and mine[-1][4]["content"] == replies[1]
    # FIFO over conversations: every first turn is sent before any third turn
    turns = [len(m) // 2 for m in seen]
    assert turns[:3] == [1, 1, 1] and turns.index(3) > max(i for i, t in enumerate(turns) if t == 1)
    point = bench.summarize(results, 1.0)
    assert point["hit_rate"] == pytest.approx((3 * (1 + 3 + 5)) / (3 * (2 + 4 + 6)))
