"""Tracing and metrics through the real stack: `tandem up` on stories260K as processes.

One module-scoped stack (every service writes finished spans to one TANDEM_TRACE_FILE; the
styler and worker serve --metrics-port) takes a short load of chat requests, then:
- the request that carried a W3C `traceparent` is one trace, continued from that parent, with
  spans from the gateway, the styler and the worker, each parented on the span that called it;
- the gateway's /metrics and the worker's /metrics show every documented metric, moved.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common import metrics
from tests.e2e.stack import UpProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


class Stack:
    def __init__(self, up: UpProcess, trace_file: Path, styler_metrics: int, worker_metrics: int) -> None:
        self.up = up
        self.trace_file = trace_file
        self.styler_metrics = styler_metrics
        self.worker_metrics = worker_metrics

    def chat(self, content: str, stream: bool = False, headers: dict[str, str] | None = None) -> Any:
        body = {
            "model": "stories260K",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": stream,
        }
        request = urllib.request.Request(
            self.up.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read().decode()
            return raw if stream else json.loads(raw)

    def spans(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stack(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    trace_file = tmp_path_factory.mktemp("trace") / "spans.jsonl"
    styler_metrics, worker_metrics = free_port(), free_port()
    up = UpProcess(
        stories_dir,
        "--styler-args",
        f"--metrics-port {styler_metrics}",
        "--worker-args",
        f"--metrics-port {worker_metrics}",
        env={"TANDEM_TRACE_FILE": str(trace_file), "OTEL_TRACES_EXPORTER": "none"},
    )
    try:
        up.wait_healthy(timeout_s=180)
        yield Stack(up, trace_file, styler_metrics, worker_metrics)
    finally:
        assert up.stop() == 0, up.output()[-3000:]


def _wait_for_spans(
    stack: Stack, trace_id: str, names: set[str], timeout_s: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in stack.spans() if s["trace_id"] == trace_id]
        if names <= {s["name"] for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def test_one_trace_across_gateway_styler_and_worker(stack: Stack) -> None:
    reply = stack.chat("Tell me a story.", headers={"traceparent": TRACEPARENT})
    assert reply["choices"][0]["message"]["content"]
    expected = {"/tandem.v1.Worker/Generate", "engine.queue_wait", "engine.prefill", "engine.decode"}
    spans = _wait_for_spans(stack, TRACE_ID, expected)
    assert {s["service"] for s in spans} == {"tandem-gateway", "tandem-styler", "tandem-worker"}, spans
    by_id = {s["span_id"]: s for s in spans}

    # The gateway's HTTP server span continues the caller's span.
    (http,) = [s for s in spans if s["service"] == "tandem-gateway" and s["kind"] == "SERVER"]
    assert http["parent_span_id"] == PARENT_SPAN_ID
    request_id = http["attributes"]["tandem.request_id"]
    assert request_id

    # Every other span hangs off a span of this trace: one tree, rooted at the HTTP span.
    for s in spans:
        if s is not http:
            assert s["parent_span_id"] in by_id, f"{s['name']} ({s['service']}) is orphaned"

    def ancestors(span: dict[str, Any]) -> list[str]:
        chain = []
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append(span["span_id"])
        return chain

    assert all(http["span_id"] in ancestors(s) for s in spans if s is not http)

    # Each rpc: a gateway CLIENT span, and the service's SERVER span as its child.
    servers = [s for s in spans if s["kind"] == "SERVER" and s is not http]
    assert {s["service"] for s in servers} == {"tandem-styler", "tandem-worker"}
    for server in servers:
        client = by_id[server["parent_span_id"]]
        assert client["kind"] == "CLIENT" and client["service"] == "tandem-gateway"
        assert client["name"] == server["name"]
    assert any(s["name"].startswith("/tandem.v1.Styler/") for s in servers)

    (generate,) = [s for s in servers if s["name"] == "/tandem.v1.Worker/Generate"]
    assert (
        generate["attributes"]["tandem.request_id"].startswith(request_id)
        or request_id in generate["attributes"]["tandem.request_id"]
    )
    phases = {s["name"]: s for s in spans if s["name"].startswith("engine.")}
    assert set(phases) == {"engine.queue_wait", "engine.prefill", "engine.decode"}
    for phase in phases.values():
        assert phase["parent_span_id"] == generate["span_id"]
        assert phase["service"] == "tandem-worker"
        assert generate["start_time_ns"] - 5_000_000 <= phase["start_time_ns"] <= phase["end_time_ns"]
    assert phases["engine.prefill"]["end_time_ns"] == phases["engine.decode"]["start_time_ns"]
    assert (
        phases["engine.decode"]["attributes"]["tandem.output_tokens"] == reply["usage"]["completion_tokens"]
    )


def test_a_streamed_request_s_first_token_is_a_timeline_across_the_services(stack: Stack) -> None:
    """The first token's moments are span events (the worker's `first_token_sent`, the gateway's
    `first_token_from_worker`, `first_chunk`, `first_chunk_written`), in that order on the wall
    clock the processes share, and benchmarks/ttft_timeline.py lines the request up from request
    in to written."""
    trace_id = "1bf7651916cd43dd8448eb211c80319d"
    raw = stack.chat(
        "Once upon a time", stream=True, headers={"traceparent": f"00-{trace_id}-{PARENT_SPAN_ID}-01"}
    )
    assert raw.count("data: ") > 2
    # (the HTTP span ends after the body's last byte, the worker's after its last chunk: wait for both)
    names = {"POST /v1/chat/completions", "/tandem.v1.Worker/Generate", "engine.prefill", "engine.decode"}
    spans = _wait_for_spans(stack, trace_id, names)
    (http,) = [s for s in spans if s["service"] == "tandem-gateway" and s["kind"] == "SERVER"]
    (rpc,) = [s for s in spans if s["kind"] == "SERVER" and s["name"] == "/tandem.v1.Worker/Generate"]
    sent = [e["time_ns"] for e in rpc["events"] if e["name"] == "first_token_sent"]
    gateway = {e["name"]: e["time_ns"] for e in http["events"]}
    assert len(sent) == 1, rpc["events"]
    assert (
        sent[0]
        <= gateway["first_token_from_worker"]
        <= gateway["first_chunk"]
        <= gateway["first_chunk_written"]
    )
    assert http["start_time_ns"] <= sent[0] and gateway["first_chunk_written"] <= http["end_time_ns"]

    from benchmarks.ttft_timeline import STAGES, timelines

    (line,) = timelines(spans)
    assert list(line) == list(STAGES)
    # the stages read off the wall clock in order (the engine's two come from its monotonic
    # clock, converted once per process: not compared here at microseconds)
    wall = [line[stage] for stage in STAGES if stage not in ("scheduled", "first token")]
    assert wall == sorted(wall), line


def test_a_request_without_traceparent_starts_its_own_trace(stack: Stack) -> None:
    before = {s["trace_id"] for s in stack.spans()}
    stack.chat("Once upon a time")

    def complete() -> bool:
        """The new trace's root and its styler and worker spans have all been exported."""
        new = [s for s in stack.spans() if s["trace_id"] not in before]
        roots = [s for s in new if s["service"] == "tandem-gateway" and s["kind"] == "SERVER"]
        services = {s["service"] for s in new if roots and s["trace_id"] == roots[0]["trace_id"]}
        return len(roots) >= 1 and services >= {"tandem-styler", "tandem-worker"}

    _wait_until(complete, "the new trace's spans")
    new = [s for s in stack.spans() if s["trace_id"] not in before]
    roots = [s for s in new if s["service"] == "tandem-gateway" and s["kind"] == "SERVER"]
    assert len(roots) == 1 and roots[0]["parent_span_id"] is None


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Polls a condition (exporters and interceptors record after the reply is sent)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _families(url: str) -> set[str]:
    """Metric families a scrape declares (`# TYPE name kind`), counters named with `_total`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def _total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def test_metrics_move_under_load(stack: Stack) -> None:
    gateway_before = _scrape(stack.up.url + "/metrics")
    worker_before = _scrape(f"http://127.0.0.1:{stack.worker_metrics}/metrics")
    prompts = [f"Tell me a story about a {animal}." for animal in ("cat", "dog", "fox", "owl")] * 2
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: stack.chat(prompts[i], stream=i % 2 == 0), range(len(prompts))))
    assert all(replies)
    gateway = _scrape(stack.up.url + "/metrics")
    worker = _scrape(f"http://127.0.0.1:{stack.worker_metrics}/metrics")
    styler = _scrape(f"http://127.0.0.1:{stack.styler_metrics}/metrics")

    moved = {
        "gateway": [
            metrics.REQUESTS,
            metrics.TIME_TO_FIRST_TOKEN + "_count",
            metrics.INTER_TOKEN_LATENCY + "_count",
            metrics.E2E_REQUEST_LATENCY + "_count",
            metrics.PROMPT_TOKENS,
            metrics.GENERATION_TOKENS,
        ],
        "worker": [
            metrics.TIME_TO_FIRST_TOKEN + "_count",
            metrics.INTER_TOKEN_LATENCY + "_count",
            metrics.E2E_REQUEST_LATENCY + "_count",
            metrics.QUEUE_WAIT + "_count",
            metrics.PROMPT_TOKENS,
            metrics.GENERATION_TOKENS,
            metrics.PREFIX_CACHE_QUERIES,
            metrics.RPCS,
            metrics.RPC_DURATION + "_count",
        ],
    }
    for service, (before, after) in {
        "gateway": (gateway_before, gateway),
        "worker": (worker_before, worker),
    }.items():
        for name in moved[service]:
            assert _total(after, name) > _total(before, name), f"{service}: {name} did not move"
    # Present (gauges read at scrape time; the cache is in use after requests ran).
    for name in (metrics.REQUESTS_RUNNING, metrics.REQUESTS_WAITING):
        assert name in gateway and name in worker, name
    assert worker[metrics.KV_CACHE_USAGE] >= 0.0
    assert worker[metrics.WEIGHT_BYTES] > 0  # stories260K's weights as loaded
    assert 0.0 <= worker[metrics.PREFIX_CACHE_HIT_RATE] <= 1.0
    # Eight requests whose prompts share the chat template's prefix: the cache saw hits.
    assert _total(worker, metrics.PREFIX_CACHE_HITS) >= 0.0
    # Every documented metric is declared by the service that owns it (KV transfer stays at
    # zero until disaggregation lands; errors appear per code once one happens).
    declared = {
        "worker": _families(f"http://127.0.0.1:{stack.worker_metrics}/metrics"),
        "gateway": _families(stack.up.url + "/metrics"),
    }
    for spec in metrics.METRICS:
        for service in ("worker", "gateway"):
            if service in spec.services:
                assert spec.name in declared[service], f"{service} does not export {spec.name}"
    # Each service froze its start-up heap once ready, and times every garbage collection since
    # (the freeze's own collection among them).
    for service, values in (("gateway", gateway), ("worker", worker), ("styler", styler)):
        assert values.get(metrics.GC_PAUSE + '_count{generation="2"}', 0) >= 1, service
    assert stack.up.output().count("froze the start-up heap") == 3, stack.up.output()[-3000:]
    # The styler counts its rpcs by method and code.
    assert _total(styler, metrics.RPCS) > 0
    assert any(k.startswith(metrics.RPCS + '{code="OK"') for k in styler)


def test_errors_are_counted_by_code(stack: Stack) -> None:
    before = _scrape(f"http://127.0.0.1:{stack.worker_metrics}/metrics")
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    socket_path = next(Path(p) for p in re.findall(r"unix:(\S+worker-0\.sock)", stack.up.output()))
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(worker_pb2.GenerateRequest(request_id="bad", prompt_token_ids=[])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    key = metrics.RPC_ERRORS + '{code="INVALID_ARGUMENT",method="Worker/Generate"}'
    url = f"http://127.0.0.1:{stack.worker_metrics}/metrics"
    # The server-side interceptor records the rpc after its status reached the client: wait for it.
    _wait_until(lambda: _scrape(url).get(key, 0) >= before.get(key, 0) + 1, key)
    after = _scrape(url)
    assert after.get(key, 0) == before.get(key, 0) + 1, [k for k in after if "error" in k]
