"""OpenTelemetry tracing for every tandem service: set-up, gRPC / aiohttp hooks, engine spans.

One trace per request: the gateway's HTTP server span (continuing an incoming W3C
`traceparent`), the client and server spans of every rpc it makes (styler Render /
DetokenizeStream, worker Generate, and a decode worker's FetchKV to its prefill worker), and
spans the worker records after a request finishes for what its engine thread did (queue wait,
prefill, decode). Propagation is the OpenTelemetry instrumentation packages' own (W3C trace
context in gRPC metadata and HTTP headers); nothing here hand-writes headers.

Tracing is chosen by the standard environment variables, read once by `setup_tracing`:

    OTEL_SDK_DISABLED=true                 off, whatever else is set
    OTEL_TRACES_EXPORTER=otlp|console|none  otlp when an OTLP endpoint is set, otherwise none
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT    where OTLP spans go (turns tracing on)
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL    grpc (default) or http/protobuf
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG]   as the SDK reads them
    TANDEM_TRACE_FILE=/path/spans.jsonl     also append each finished span as one JSON line

With none of them set tracing is off and costs nothing: no provider is installed, the
interceptor and middleware lists are empty, and `span()` / `record_span()` return at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from services.common import switches
from services.common.logging import request_id_var

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

log = logging.getLogger(__name__)

TRACE_FILE_ENV = switches.TRACE_FILE.name
REQUEST_ID_ATTRIBUTE = "tandem.request_id"
# Health checks and reflection are polled every few seconds by probes and `tandem up`: tracing
# them would bury the request traces.
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
UNTRACED_HTTP_PATHS = frozenset({"/health", "/metrics", "/ping"})
TRACER_NAME = "tandem"

_lock = threading.Lock()
_provider: TracerProvider | None = None


# ---------------------------------------------------------------------------------------------
# Set-up


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def trace_exporters_from_env(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for: a subset of otlp, console, file (empty = off)."""
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    endpoint_set = bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not names:
        # The SDK's own default is otlp; ours is "otlp only when an endpoint was given", so a
        # developer's laptop does not spend time retrying a collector on localhost:4317.
        names = ["otlp"] if endpoint_set else []
    chosen = [n for n in names if n in ("otlp", "console")]
    unknown = [n for n in names if n not in ("otlp", "console", "none")]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: ignoring unsupported exporter(s) %s", ", ".join(unknown))
    if env.get(TRACE_FILE_ENV):
        chosen.append("file")
    return chosen


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()  # endpoint, headers, TLS, timeout: read by the exporter from OTEL_*
    if protocol in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported value {protocol!r} (use grpc or http/protobuf)"
    )


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the global tracer provider the environment asks for; return whether tracing is on.

    Idempotent: the first call in a process decides. `service_name` is the default
    `service.name` (OTEL_SERVICE_NAME wins). The provider is flushed at interpreter exit.
    """
    global _provider
    env = os.environ if env is None else env
    with _lock:
        if _provider is not None:
            return True
        exporters = trace_exporters_from_env(env)
        if not exporters:
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        attributes: dict[str, Any] = {}
        if not env.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = service_name
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; the sampler comes
        # from OTEL_TRACES_SAMPLER (default: parent-based always-on).
        provider = TracerProvider(resource=Resource.create(attributes))
        for name in exporters:
            if name == "otlp":
                provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
            elif name == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            elif name == "file":
                # Written as each span ends so a test (or a person tailing it) sees it at once.
                provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(env[TRACE_FILE_ENV])))
        trace.set_tracer_provider(provider)
        _provider = provider
    log.info("tracing on for %s (%s)", service_name, ", ".join(exporters))
    return True


def tracing_enabled() -> bool:
    """Whether `setup_tracing` installed a provider in this process."""
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush and stop the exporters (also done at interpreter exit)."""
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()


# ---------------------------------------------------------------------------------------------
# The JSON-lines file exporter (TANDEM_TRACE_FILE)


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """The fields of a finished span that a person or a test needs, JSON-ready."""
    ctx = span.get_span_context()
    parent = span.parent
    resource = span.resource.attributes if span.resource is not None else {}
    return {
        "name": span.name,
        "service": resource.get("service.name", ""),
        "kind": span.kind.name if span.kind is not None else "INTERNAL",
        "trace_id": format(ctx.trace_id, "032x") if ctx is not None else "",
        "span_id": format(ctx.span_id, "016x") if ctx is not None else "",
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "start_time_ns": span.start_time,
        "end_time_ns": span.end_time,
        "status": span.status.status_code.name,
        "events": [{"name": e.name, "time_ns": e.timestamp} for e in span.events],
        "attributes": {
            k: (
                v
                if isinstance(v, (str, int, float, bool))
                else str(v)
                if isinstance(v, Mapping)
                else list(v or ())
            )
            for k, v in (span.attributes or {}).items()
        },
    }


class JsonLinesSpanExporter(SpanExporter):
    """Append each finished span as one JSON object per line to a file.

    Several processes may share the file: each line is one `write` on a file opened with
    O_APPEND, which Linux keeps whole.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_to_dict(s), ensure_ascii=False) + "\n" for s in spans).encode()
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            os.write(self._fd, data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# gRPC and aiohttp hooks (empty when tracing is off)


def _untraced_rpc(handler_call_details: Any) -> bool:
    method = getattr(handler_call_details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    return any(method.lstrip("/").startswith(name) for name in UNTRACED_GRPC_SERVICES)


def _traced_rpc(handler_call_details: Any) -> bool:
    return not _untraced_rpc(handler_call_details)


def grpc_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Server interceptors that continue the caller's trace: an rpc server span (its
    `tandem.request_id` attribute read from the request message), empty when tracing is off."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_rpc), RequestIdServerInterceptor()]


def grpc_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that start an rpc client span and send its context in the metadata."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_traced_rpc))


def aiohttp_middlewares() -> list[Callable[..., Any]]:
    """aiohttp middlewares for the gateway: an HTTP server span per request that continues an
    incoming `traceparent`, tagged with the response's `X-Request-Id`; empty when tracing is off.

    Add them first (outermost) so that every other middleware and handler runs inside the span:
    `web.Application(middlewares=[*telemetry.aiohttp_middlewares(), ...])`.
    """
    if not tracing_enabled():
        return []
    from aiohttp import web
    from opentelemetry.instrumentation.aiohttp_server import (
        AioHttpServerInstrumentor,
        create_aiohttp_middleware,
    )

    # The package's middleware reads module state (excluded URLs, semantic-convention mode,
    # meters) that only `instrument()` initialises; `instrument()` also swaps
    # `web.Application` for a subclass that adds the middleware to every app in the process.
    # Initialise, then undo the swap: the gateway adds the middleware to its own app only.
    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument()
    instrumentor.uninstrument()
    otel_middleware = create_aiohttp_middleware()

    @web.middleware
    async def tracing_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        if request.path in UNTRACED_HTTP_PATHS:
            return await handler(request)

        async def tagged(req: web.Request) -> web.StreamResponse:
            try:
                response: web.StreamResponse = await handler(req)
            finally:
                # The gateway sets request_id_var in this same task (and X-Request-Id on replies).
                request_id = request_id_var.get()
                if request_id != "-":
                    set_request_id(request_id)
            if "X-Request-Id" in response.headers:
                set_request_id(response.headers["X-Request-Id"])
            return response

        response: web.StreamResponse = await otel_middleware(request, tagged)
        return response

    return [tracing_middleware]


def instrument_aiohttp_app(app: web.Application) -> None:
    """Put the tracing middleware in front of an existing app's middlewares (before startup)."""
    for middleware in reversed(aiohttp_middlewares()):
        app.middlewares.insert(0, middleware)  # type: ignore[arg-type]


class RequestIdServerInterceptor(grpc.aio.ServerInterceptor):
    """Copies a request message's `request_id` field onto the current rpc span.

    Runs inside the OpenTelemetry server interceptor, so the current span is the rpc's. Only
    unary-request rpcs are tagged here; streaming-request handlers call `set_request_id`.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or not tracing_enabled():
            return handler
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _tag_request(request)
                result = inner_stream(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write() and returns None
                    await result

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        inner_unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _tag_request(request)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )


def _tag_request(request: Any) -> None:
    request_id = getattr(request, "request_id", None)
    if isinstance(request_id, str) and request_id:
        set_request_id(request_id)


def set_request_id(request_id: str) -> None:
    """Tag the current span with the request id (no-op when tracing is off)."""
    if _provider is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


# ---------------------------------------------------------------------------------------------
# Spans in code: live spans, and spans recorded after the fact for the engine thread


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span | None]:
    """A live child span of the current one (None and no work when tracing is off)."""
    if _provider is None:
        yield None
        return
    with tracer().start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current


def event(name: str) -> None:
    """A timestamped event on the current span (no-op when tracing is off or no span is current):
    the moments inside a span that a timeline needs, such as a request's first token."""
    if _provider is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.add_event(name)


def capture_context() -> otel_context.Context | None:
    """The current trace context, to parent spans recorded later from another thread."""
    if _provider is None:
        return None
    return otel_context.get_current()


# The offset between the monotonic clock (what engines time with) and the wall clock (what
# spans carry), taken once so that all spans of a process agree with each other.
_MONOTONIC_TO_EPOCH_NS = time.time_ns() - time.monotonic_ns()


def monotonic_to_epoch_ns(t: float) -> int:
    """A `time.monotonic()` reading as Unix-epoch nanoseconds."""
    return int(t * 1e9) + _MONOTONIC_TO_EPOCH_NS


def record_span(
    name: str,
    start: float,
    end: float,
    parent: otel_context.Context | None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Record a finished span from `time.monotonic()` start/end readings under `parent`.

    For work done off the rpc's context (the engine thread): capture the rpc's context with
    `capture_context()` when the request arrives, record its phases when it finishes.
    """
    if _provider is None or parent is None:
        return
    s = tracer().start_span(
        name, context=parent, attributes=dict(attributes or {}), start_time=monotonic_to_epoch_ns(start)
    )
    s.end(end_time=max(monotonic_to_epoch_ns(end), monotonic_to_epoch_ns(start)))


@dataclass(frozen=True)
class RequestTimeline:
    """When one worker request passed each phase (`time.monotonic()` seconds; None: never)."""

    request_id: str
    arrival: float
    """The request reached the engine's waiting queue."""
    finished: float
    """The request finished, was aborted or failed."""
    scheduled: float | None = None
    """The scheduler first gave it tokens (queue wait ends, prefill starts)."""
    first_token: float | None = None
    """The first output token was sampled (prefill ends, decode starts)."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (or fetched from a prefill worker)."""
    num_output_tokens: int = 0
    finish_reason: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Extra attributes put on every phase span."""


def record_request_timeline(timeline: RequestTimeline, parent: otel_context.Context | None) -> None:
    """Record the engine-side phase spans of one finished request under `parent`:
    `engine.queue_wait` (arrival -> scheduled), `engine.prefill` (scheduled -> first token)
    and `engine.decode` (first token -> finished, a summary: tokens and mean inter-token time).
    """
    if _provider is None or parent is None:
        return
    common = {REQUEST_ID_ATTRIBUTE: timeline.request_id, **timeline.attributes}
    scheduled = timeline.scheduled if timeline.scheduled is not None else timeline.finished
    record_span("engine.queue_wait", timeline.arrival, scheduled, parent, common)
    if timeline.scheduled is None:
        return
    prefill_end = timeline.first_token if timeline.first_token is not None else timeline.finished
    record_span(
        "engine.prefill",
        timeline.scheduled,
        prefill_end,
        parent,
        {
            **common,
            "tandem.prompt_tokens": timeline.num_prompt_tokens,
            "tandem.cached_prompt_tokens": timeline.num_cached_tokens,
        },
    )
    if timeline.first_token is None:
        return
    num_decoded = max(timeline.num_output_tokens - 1, 0)
    decode_s = timeline.finished - timeline.first_token
    record_span(
        "engine.decode",
        timeline.first_token,
        timeline.finished,
        parent,
        {
            **common,
            "tandem.output_tokens": timeline.num_output_tokens,
            "tandem.mean_inter_token_seconds": decode_s / num_decoded if num_decoded else 0.0,
            "tandem.finish_reason": timeline.finish_reason,
        },
    )
