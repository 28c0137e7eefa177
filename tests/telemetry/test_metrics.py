"""services/common/metrics.py: registry helpers, the metrics port, and the gRPC interceptor's
counts by status code, on a real grpc.aio server."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.common import metrics
from services.common.server import GrpcServer


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_documented_name_has_the_prefix_and_exports_as_named() -> None:
    registry = CollectorRegistry()
    metric: Counter | Gauge | Histogram
    for spec in metrics.METRICS:
        assert spec.name.startswith("tandem:")
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
            metric = metrics.counter(spec.name, registry=registry)
        elif spec.kind == "gauge":
            metric = metrics.gauge(spec.name, registry=registry)
        else:
            metric = metrics.histogram(spec.name, registry=registry)
        assert (metric.labels(*["x"] * len(spec.labels)) if spec.labels else metric) is not None
    text = generate_latest(registry).decode()
    for spec in metrics.METRICS:
        suffix = "_bucket" if spec.kind == "histogram" else ""
        if spec.labels and spec.kind != "histogram":
            assert re.search(rf"^{re.escape(spec.name)}{suffix}\{{", text, re.M), spec.name
        elif not spec.labels:
            assert re.search(rf"^{re.escape(spec.name)}{suffix}[ {{]", text, re.M), spec.name


def test_helpers_return_the_same_metric() -> None:
    registry = CollectorRegistry()
    assert metrics.counter(metrics.PROMPT_TOKENS, registry=registry) is metrics.counter(
        metrics.PROMPT_TOKENS, registry=registry
    )


def test_observe_finished_request_and_gauges() -> None:
    registry = CollectorRegistry()
    metrics.observe_finished_request(
        arrival=10.0,
        scheduled=10.5,
        first_token=11.0,
        finished=13.0,
        num_prompt_tokens=7,
        num_output_tokens=5,
        registry=registry,
    )
    assert sample(registry, "tandem:prompt_tokens_total") == 7
    assert sample(registry, "tandem:generation_tokens_total") == 5
    assert sample(registry, "tandem:time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert sample(registry, "tandem:request_queue_seconds_sum") == pytest.approx(0.5)
    assert sample(registry, "tandem:e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    assert sample(registry, "tandem:inter_token_latency_seconds_count") == 4
    assert sample(registry, "tandem:inter_token_latency_seconds_sum") == pytest.approx(2.0)
    waiting = [3]
    metrics.gauge_from(metrics.REQUESTS_WAITING, lambda: waiting[0], registry=registry)
    assert sample(registry, "tandem:requests_waiting") == 3
    waiting[0] = 1
    assert sample(registry, "tandem:requests_waiting") == 1
    metrics.observe_kv_transfer("send", 4096, 0.01, registry=registry)
    assert sample(registry, "tandem:kv_transfer_bytes_total", direction="send", transport="grpc") == 4096
    assert sample(registry, "tandem:kv_transfer_seconds_count", direction="send", transport="grpc") == 1


def test_metrics_server_serves_the_registry() -> None:
    registry = CollectorRegistry()
    metrics.counter(metrics.GENERATION_TOKENS, registry=registry).inc(3)
    port = metrics.start_metrics_server(0, host="127.0.0.1", registry=registry)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "tandem:generation_tokens_total 3.0" in body


def _ident(data: bytes) -> bytes:
    return data


async def test_grpc_interceptor_counts_by_code() -> None:
    registry = CollectorRegistry()

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        return b""

    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(2):
            yield request
        if request == b"fail":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")

    handler = grpc.method_handlers_generic_handler(
        "tandem.v1.Probe",
        {
            "Ok": grpc.unary_unary_rpc_method_handler(ok, _ident, _ident),
            "Invalid": grpc.unary_unary_rpc_method_handler(invalid, _ident, _ident),
            "Crash": grpc.unary_unary_rpc_method_handler(crash, _ident, _ident),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _ident, _ident),
        },
    )
    server = GrpcServer("127.0.0.1:0", grace_s=1, interceptors=[metrics.GrpcMetricsInterceptor(registry)])
    server.server.add_generic_rpc_handlers((handler,))
    server.add_service_name("tandem.v1.Probe")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            for _ in range(2):
                assert await channel.unary_unary("/tandem.v1.Probe/Ok")(b"hi") == b"hi"
            for method, code in (
                ("Invalid", grpc.StatusCode.INVALID_ARGUMENT),
                ("Crash", grpc.StatusCode.UNKNOWN),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/tandem.v1.Probe/{method}")(b"x")
                assert info.value.code() == code
            assert [m async for m in channel.unary_stream("/tandem.v1.Probe/Stream")(b"s")] == [b"s", b"s"]
            with pytest.raises(grpc.aio.AioRpcError):
                _ = [m async for m in channel.unary_stream("/tandem.v1.Probe/Stream")(b"fail")]
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop()
    assert sample(registry, "tandem:rpcs_total", method="Probe/Ok", code="OK") == 2
    assert sample(registry, "tandem:rpcs_total", method="Probe/Invalid", code="INVALID_ARGUMENT") == 1
    assert sample(registry, "tandem:rpc_errors_total", method="Probe/Invalid", code="INVALID_ARGUMENT") == 1
    assert sample(registry, "tandem:rpc_errors_total", method="Probe/Crash", code="UNKNOWN") == 1
    assert sample(registry, "tandem:rpcs_total", method="Probe/Stream", code="OK") == 1
    assert sample(registry, "tandem:rpc_errors_total", method="Probe/Stream", code="RESOURCE_EXHAUSTED") == 1
    assert sample(registry, "tandem:rpc_errors_total", method="Probe/Ok", code="OK") == 0
    assert sample(registry, "tandem:rpc_duration_seconds_count", method="Probe/Ok") == 2
    assert "Health" not in generate_latest(registry).decode()
