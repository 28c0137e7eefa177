"""services/common/telemetry.py: env selection, the JSON-lines exporter, gRPC propagation and
engine-side spans, through real grpc.aio servers and channels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import telemetry
from services.common.telemetry import trace_exporters_from_env

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def test_tracing_is_off_without_otel_env() -> None:
    assert trace_exporters_from_env({}) == []
    assert trace_exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []


def test_otlp_when_an_endpoint_is_set() -> None:
    assert trace_exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert trace_exporters_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == [
        "otlp"
    ]
    assert trace_exporters_from_env({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]


def test_sdk_disabled_wins_and_file_exporter_adds() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
        "OTEL_SDK_DISABLED": "true",
        "TANDEM_TRACE_FILE": "/x",
    }
    assert trace_exporters_from_env(env) == []
    assert trace_exporters_from_env({"TANDEM_TRACE_FILE": "/tmp/s.jsonl"}) == ["file"]


def test_hooks_are_empty_and_free_when_off() -> None:
    if telemetry.tracing_enabled():
        pytest.skip("another test in this process turned tracing on")
    assert telemetry.grpc_server_interceptors() == []
    assert telemetry.grpc_client_interceptors() == []
    assert telemetry.aiohttp_middlewares() == []
    assert telemetry.capture_context() is None
    with telemetry.span("nothing") as s:
        assert s is None
    telemetry.record_span("x", 0.0, 1.0, None)  # no provider, no parent: returns at once


def test_bad_otlp_protocol_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        telemetry._otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_grpc_spans_continue_the_incoming_trace(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"TANDEM_TRACE_FILE": str(trace_file), "PYTHONPATH": str(REPO_ROOT)}
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("trace_probe.py")), traceparent],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    assert {s["trace_id"] for s in spans} == {TRACE_ID}, "every span continues the incoming trace"
    assert {s["service"] for s in spans} == {"probe-service"}
    root = by_name["client-root"][0]
    assert root["parent_span_id"] == PARENT_SPAN_ID
    for method in ("Echo", "Stream"):
        (client,) = [s for s in by_name[f"/probe.Echo/{method}"] if s["kind"] == "CLIENT"]
        (server,) = [s for s in by_name[f"/probe.Echo/{method}"] if s["kind"] == "SERVER"]
        assert client["parent_span_id"] == root["span_id"]
        assert server["parent_span_id"] == client["span_id"]
        assert server["attributes"]["tandem.request_id"] == f"req-{method.lower()}"
    stream_server = next(s for s in by_name["/probe.Echo/Stream"] if s["kind"] == "SERVER")
    for phase in ("engine.queue_wait", "engine.prefill", "engine.decode"):
        (span,) = by_name[phase]
        assert span["parent_span_id"] == stream_server["span_id"]
        assert span["attributes"]["tandem.request_id"] == "req-stream"
        assert span["end_time_ns"] >= span["start_time_ns"]
    queue, prefill, decode = (by_name[p][0] for p in ("engine.queue_wait", "engine.prefill", "engine.decode"))
    assert queue["end_time_ns"] == prefill["start_time_ns"]
    assert prefill["end_time_ns"] == decode["start_time_ns"]
    assert decode["attributes"]["tandem.output_tokens"] == 3
    assert prefill["attributes"]["tandem.prompt_tokens"] == 5
