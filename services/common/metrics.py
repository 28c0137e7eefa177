"""Prometheus metrics shared by every tandem service: names, registry helpers, the metrics
port, and a gRPC server interceptor that counts rpcs and errors by status code.

Every metric is named `tandem:<what>` (the gateway's, the styler's and the workers' alike, told
apart by the scrape's `job` / `instance` labels). The names, their labels and meaning are listed
in `METRICS` below and in the README's "Deploy" section; the Grafana dashboard in deploy/grafana/ plots them.

    start_metrics_server(9090)                           # /metrics on its own port (styler, worker)
    GrpcServer(addr, interceptors=[GrpcMetricsInterceptor()])  # rpcs / errors by code
    counter(PROMPT_TOKENS).inc(n)                        # get-or-create on the default registry
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.telemetry import RequestTimeline

# --- names (exactly as exported; counters get `_total`) ---------------------------------------
REQUESTS = "tandem:requests_total"
TIME_TO_FIRST_TOKEN = "tandem:time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "tandem:inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "tandem:e2e_request_latency_seconds"
QUEUE_WAIT = "tandem:request_queue_seconds"
PROMPT_TOKENS = "tandem:prompt_tokens_total"
GENERATION_TOKENS = "tandem:generation_tokens_total"
REQUESTS_RUNNING = "tandem:requests_running"
REQUESTS_WAITING = "tandem:requests_waiting"
KV_CACHE_USAGE = "tandem:kv_cache_usage_ratio"
WEIGHT_BYTES = "tandem:model_weight_bytes"
PREFIX_CACHE_HIT_RATE = "tandem:prefix_cache_hit_rate"
PREFIX_CACHE_HOST_HITS = "tandem:prefix_cache_host_hit_tokens"
PREFIX_CACHE_QUERIES = "tandem:prefix_cache_queries_total"
PREFIX_CACHE_HITS = "tandem:prefix_cache_hits_total"
PROMPT_PREFILLS = "tandem:prompt_prefills"
KV_TRANSFER_BYTES = "tandem:kv_transfer_bytes_total"
KV_TRANSFER_SECONDS = "tandem:kv_transfer_seconds"
KV_WIRE_HELPERS = "tandem:kv_wire_helpers"
KV_WIRE_HELPER_STREAMS = "tandem:kv_wire_helper_streams_total"
KV_PEER_BYTES = "tandem:kv_peer_fetch_bytes_total"
KV_PEER_SECONDS = "tandem:kv_peer_fetch_seconds_total"
KV_PEER_GBPS = "tandem:kv_peer_fetch_gb_per_second"
KV_PEER_FAILURES = "tandem:kv_peer_fetch_failures_total"
PREEMPTIONS = "tandem:preemptions"
KV_SWAPPED_OUT = "tandem:kv_swapped_out_sequences"
KV_SWAPPED_IN = "tandem:kv_swapped_in_sequences"
RPCS = "tandem:rpcs_total"
RPC_ERRORS = "tandem:rpc_errors_total"
RPC_DURATION = "tandem:rpc_duration_seconds"
GUIDED_REQUESTS = "tandem:guided_requests_total"
SPEC_DRAFT_TOKENS = "tandem:spec_decode_draft_tokens"
SPEC_ACCEPTED_TOKENS = "tandem:spec_decode_accepted_tokens"
SPEC_ACCEPTANCE_RATE = "tandem:spec_decode_acceptance_rate"
SPEC_MEAN_ACCEPTED_LENGTH = "tandem:spec_decode_mean_accepted_length"
IMAGES_ENCODED = "tandem:images_encoded"
ENCODER_CACHE_HITS = "tandem:encoder_cache_hits"
IMAGES_BY_HASH = "tandem:images_by_hash"
IMAGE_HASH_MISSES = "tandem:image_hash_misses"
IMAGE_BYTES_RECEIVED = "tandem:image_bytes_received"
GC_PAUSE = "tandem:gc_pause_seconds"

# Bucket edges: latency from a millisecond (tiny models on a GPU) to minutes (long generations on a CPU).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    300.0,
)
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RPC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


@dataclass(frozen=True)
class MetricSpec:
    """One documented metric: its exported name, type, labels and meaning."""

    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    services: tuple[str, ...]
    buckets: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        REQUESTS, "counter", ("route", "status", "finish_reason"), "Finished HTTP requests.", ("gateway",)
    ),
    MetricSpec(
        TIME_TO_FIRST_TOKEN,
        "histogram",
        (),
        "Seconds from arrival to the first output token.",
        ("gateway", "worker"),
        TTFT_BUCKETS,
    ),
    MetricSpec(
        INTER_TOKEN_LATENCY,
        "histogram",
        (),
        "Seconds between consecutive output tokens of a request.",
        ("gateway", "worker"),
        ITL_BUCKETS,
    ),
    MetricSpec(
        E2E_REQUEST_LATENCY,
        "histogram",
        (),
        "Seconds from arrival to the last token.",
        ("gateway", "worker"),
        E2E_BUCKETS,
    ),
    MetricSpec(
        QUEUE_WAIT,
        "histogram",
        (),
        "Seconds a request waited in the worker's queue before its first schedule.",
        ("worker",),
        E2E_BUCKETS,
    ),
    MetricSpec(PROMPT_TOKENS, "counter", (), "Prompt tokens of finished requests.", ("gateway", "worker")),
    MetricSpec(GENERATION_TOKENS, "counter", (), "Generated tokens.", ("gateway", "worker")),
    MetricSpec(REQUESTS_RUNNING, "gauge", (), "Requests being generated now.", ("gateway", "worker")),
    MetricSpec(
        REQUESTS_WAITING,
        "gauge",
        (),
        "Requests queued, not yet running (the autoscaling signal).",
        ("gateway", "worker"),
    ),
    MetricSpec(KV_CACHE_USAGE, "gauge", (), "Fraction of KV-cache blocks in use (0..1).", ("worker",)),
    MetricSpec(
        WEIGHT_BYTES,
        "gauge",
        (),
        "Bytes of the model's weights on the device (quantized layers at their stored size).",
        ("worker",),
    ),
    MetricSpec(
        PREFIX_CACHE_HIT_RATE,
        "gauge",
        (),
        "Fraction of prompt tokens served from the prefix cache (0..1, since start).",
        ("worker",),
    ),
    MetricSpec(
        PREFIX_CACHE_HOST_HITS,
        "gauge",
        (),
        "Prompt tokens whose KV came back from the host-memory tier (--kv-offload-memory), since start.",
        ("worker",),
    ),
    MetricSpec(
        IMAGES_ENCODED,
        "gauge",
        (),
        "Image-in models: images run through the vision encoder, since start.",
        ("worker",),
    ),
    MetricSpec(
        ENCODER_CACHE_HITS,
        "gauge",
        (),
        "Image-in models: images whose embeddings came from the encoder cache, since start.",
        ("worker",),
    ),
    MetricSpec(
        IMAGES_BY_HASH,
        "gauge",
        (),
        "Image-in models: images that came as their content hash alone (no pixels), since start.",
        ("worker",),
    ),
    MetricSpec(
        IMAGE_HASH_MISSES,
        "gauge",
        (),
        "Image-in models: hash-only images refused as not held (the gateway resent the pixels), since start.",
        ("worker",),
    ),
    MetricSpec(
        IMAGE_BYTES_RECEIVED,
        "gauge",
        (),
        "Image-in models: bytes of pixels and embedding rows received with requests, since start.",
        ("worker",),
    ),
    MetricSpec(
        SPEC_DRAFT_TOKENS,
        "gauge",
        (),
        "Speculative decoding: drafted tokens verified, since start.",
        ("worker",),
    ),
    MetricSpec(
        SPEC_ACCEPTED_TOKENS,
        "gauge",
        (),
        "Speculative decoding: drafted tokens kept by verification, since start.",
        ("worker",),
    ),
    MetricSpec(
        SPEC_ACCEPTANCE_RATE,
        "gauge",
        (),
        "Speculative decoding: fraction of drafted tokens kept (0..1, since start).",
        ("worker",),
    ),
    MetricSpec(
        SPEC_MEAN_ACCEPTED_LENGTH,
        "gauge",
        (),
        "Speculative decoding: tokens one verification appends on average (kept drafts + 1, since start).",
        ("worker",),
    ),
    MetricSpec(
        PREFIX_CACHE_QUERIES, "counter", (), "Prompt tokens looked up in the prefix cache.", ("worker",)
    ),
    MetricSpec(PREFIX_CACHE_HITS, "counter", (), "Prompt tokens found in the prefix cache.", ("worker",)),
    MetricSpec(
        PROMPT_PREFILLS,
        "gauge",
        (),
        "Prompts whose KV this worker computed, since start: one per request however many choices, "
        "beams or best_of candidates share it; not those whose KV came from a prefill worker.",
        ("worker",),
    ),
    MetricSpec(
        KV_TRANSFER_BYTES,
        "counter",
        ("direction", "transport"),
        "KV-cache bytes sent (prefill side) or received (decode side).",
        ("worker",),
    ),
    MetricSpec(
        KV_TRANSFER_SECONDS,
        "histogram",
        ("direction", "transport"),
        "Seconds one KV transfer (FetchKV stream) took.",
        ("worker",),
        TRANSFER_BUCKETS,
    ),
    MetricSpec(
        KV_WIRE_HELPERS,
        "gauge",
        (),
        "Wire helper processes running (--kv-wire-helpers; one that exited is not restarted: fewer than "
        "asked for means some went, and the worker's own streams carry what they would have).",
        ("worker",),
    ),
    MetricSpec(
        KV_WIRE_HELPER_STREAMS,
        "counter",
        ("direction",),
        "FetchKV streams the wire helpers carried: served (prefill side) or read (decode side).",
        ("worker",),
    ),
    MetricSpec(
        KV_PEER_BYTES,
        "counter",
        ("peer", "transport"),
        "Decode side: KV bytes fetched from each prefill worker (peer) over each transport.",
        ("worker",),
    ),
    MetricSpec(
        KV_PEER_SECONDS,
        "counter",
        ("peer", "transport"),
        "Decode side: seconds the KV fetches from each peer over each transport took (bytes / seconds = GB/s).",
        ("worker",),
    ),
    MetricSpec(
        KV_PEER_GBPS,
        "gauge",
        ("peer", "transport"),
        "Decode side: GB/s (1e9 bytes) of the last KV fetch from each peer over each transport.",
        ("worker",),
    ),
    MetricSpec(
        KV_PEER_FAILURES,
        "counter",
        ("peer", "transport"),
        "Decode side: KV fetches from each peer that failed (the prompt was recomputed).",
        ("worker",),
    ),
    MetricSpec(
        PREEMPTIONS,
        "gauge",
        (),
        "Sequences preempted for lack of KV blocks (by recompute or swap), since start.",
        ("worker",),
    ),
    MetricSpec(
        KV_SWAPPED_OUT,
        "gauge",
        (),
        "Preempted sequences whose KV was swapped out to the host tier (--kv-offload-memory), since start.",
        ("worker",),
    ),
    MetricSpec(
        KV_SWAPPED_IN,
        "gauge",
        (),
        "Swapped-out sequences whose KV was copied back to the device, since start.",
        ("worker",),
    ),
    MetricSpec(
        RPCS,
        "counter",
        ("method", "code"),
        "gRPC rpcs handled, by method and status code.",
        ("styler", "worker"),
    ),
    MetricSpec(
        RPC_ERRORS,
        "counter",
        ("method", "code"),
        "gRPC rpcs that ended with a status other than OK.",
        ("styler", "worker"),
    ),
    MetricSpec(
        RPC_DURATION,
        "histogram",
        ("method",),
        "Seconds from rpc start to its last message.",
        ("styler", "worker"),
        RPC_BUCKETS,
    ),
    MetricSpec(
        GUIDED_REQUESTS,
        "counter",
        ("kind",),
        "Guided (structured-output) requests admitted, by constraint kind.",
        ("worker",),
    ),
    MetricSpec(
        GC_PAUSE,
        "histogram",
        ("generation",),
        "Seconds each of Python's garbage collections held the process (services/common/gc_heap.py).",
        ("gateway", "styler", "worker"),
        GC_BUCKETS,
    ),
)
SPECS = {spec.name: spec for spec in METRICS}

# --- registry helpers ---------------------------------------------------------------------------

_create_lock = threading.Lock()
# Keyed by the registry object itself (weakly): keying by id() handed a dead registry's metric to a
# new registry that happened to reuse its address.
_created: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def _get_or_create(name: str, factory: Callable[[], Any], registry: CollectorRegistry) -> Any:
    with _create_lock:
        made = _created.setdefault(registry, {})
        if name not in made:
            made[name] = factory()
        return made[name]


def _spec(name: str, labels: Sequence[str] | None, help_text: str | None) -> tuple[tuple[str, ...], str]:
    spec = SPECS.get(name)
    return (
        tuple(labels) if labels is not None else (spec.labels if spec else ()),
        help_text or (spec.help if spec else name),
    )


def counter(
    name: str,
    help_text: str | None = None,
    labels: Sequence[str] | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> Counter:
    """The counter `name` on `registry`, created on first use (labels/help from `METRICS`)."""
    label_names, doc = _spec(name, labels, help_text)
    # prometheus_client adds `_total` itself; give it the base name so the export is `name`.
    return _get_or_create(
        name,
        lambda: Counter(name.removesuffix("_total"), doc, label_names, registry=registry),
        registry,
    )


def gauge(
    name: str,
    help_text: str | None = None,
    labels: Sequence[str] | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> Gauge:
    """The gauge `name` on `registry`, created on first use."""
    label_names, doc = _spec(name, labels, help_text)
    return _get_or_create(
        name,
        lambda: Gauge(name, doc, label_names, registry=registry),
        registry,
    )


def histogram(
    name: str,
    help_text: str | None = None,
    labels: Sequence[str] | None = None,
    buckets: Sequence[float] | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> Histogram:
    """The histogram `name` on `registry`, created on first use (buckets from `METRICS`)."""
    label_names, doc = _spec(name, labels, help_text)
    spec = SPECS.get(name)
    edges = (
        tuple(buckets)
        if buckets is not None
        else (spec.buckets if spec and spec.buckets else Histogram.DEFAULT_BUCKETS)
    )
    return _get_or_create(
        name,
        lambda: Histogram(name, doc, label_names, buckets=edges, registry=registry),
        registry,
    )


def declare(service: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Create every documented metric of `service` ("gateway", "styler", "worker") now, so a
    scrape lists each family (HELP / TYPE) before its first observation."""
    for spec in METRICS:
        if spec.name == GC_PAUSE:  # read at each scrape by gc_heap.PAUSE_COLLECTOR, not created here
            continue
        if service in spec.services:
            if spec.kind == "counter":
                counter(spec.name, registry=registry)
            elif spec.kind == "gauge":
                gauge(spec.name, registry=registry)
            else:
                histogram(spec.name, registry=registry)


def gauge_from(name: str, read: Callable[[], float], registry: CollectorRegistry = REGISTRY) -> Gauge:
    """The gauge `name`, its value read by calling `read()` at each scrape (for state a service
    already keeps, like the engine's queue lengths: nothing to update on the hot path)."""
    g = gauge(name, registry=registry)
    g.set_function(read)
    return g


def start_metrics_server(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve `GET /metrics` on `host:port` from a daemon thread; return the bound port (port 0
    picks a free one). A service calls this once, when `--metrics-port` is set."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


# --- worker-side request observations -----------------------------------------------------------


def observe_finished_request(
    *,
    arrival: float,
    finished: float,
    scheduled: float | None,
    first_token: float | None,
    num_prompt_tokens: int,
    num_output_tokens: int,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Record one finished request's latencies and token counts (`time.monotonic()` seconds).

    Inter-token latency is observed once per request as its mean gap, weighted by the number of
    gaps, so that the histogram's sum / count is the true mean over all tokens.
    """
    histogram(E2E_REQUEST_LATENCY, registry=registry).observe(max(finished - arrival, 0.0))
    if scheduled is not None:
        histogram(QUEUE_WAIT, registry=registry).observe(max(scheduled - arrival, 0.0))
    if first_token is not None:
        histogram(TIME_TO_FIRST_TOKEN, registry=registry).observe(max(first_token - arrival, 0.0))
        gaps = num_output_tokens - 1
        if gaps > 0:
            mean_gap = max(finished - first_token, 0.0) / gaps
            itl = histogram(INTER_TOKEN_LATENCY, registry=registry)
            for _ in range(min(gaps, 64)):  # bounded: a 10k-token answer costs 64 observations
                itl.observe(mean_gap)
    counter(PROMPT_TOKENS, registry=registry).inc(num_prompt_tokens)
    counter(GENERATION_TOKENS, registry=registry).inc(num_output_tokens)


def observe_timeline(timeline: RequestTimeline, registry: CollectorRegistry = REGISTRY) -> None:
    """`observe_finished_request` from a worker request's timeline, plus prefix-cache lookups."""
    observe_finished_request(
        arrival=timeline.arrival,
        finished=timeline.finished,
        scheduled=timeline.scheduled,
        first_token=timeline.first_token,
        num_prompt_tokens=timeline.num_prompt_tokens,
        num_output_tokens=timeline.num_output_tokens,
        registry=registry,
    )
    counter(PREFIX_CACHE_QUERIES, registry=registry).inc(timeline.num_prompt_tokens)
    counter(PREFIX_CACHE_HITS, registry=registry).inc(timeline.num_cached_tokens)


def observe_kv_transfer(
    direction: str,
    num_bytes: int,
    seconds: float,
    transport: str = "grpc",
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Record one KV transfer: `direction` is "send" (prefill worker) or "receive" (decode worker),
    `transport` "grpc", "cuda-ipc" or "nixl" (bytes / seconds per transport = its GB/s)."""
    labels = {"direction": direction, "transport": transport}
    counter(KV_TRANSFER_BYTES, registry=registry).labels(**labels).inc(num_bytes)
    histogram(KV_TRANSFER_SECONDS, registry=registry).labels(**labels).observe(max(seconds, 0.0))


# --- gRPC server interceptor -----------------------------------------------------------------


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "OK" if code is None else str(code)


def _short_method(full_method: str | bytes) -> str:
    """`/tandem.v1.Worker/Generate` -> `Worker/Generate` (short, still unique in tandem)."""
    text = full_method.decode() if isinstance(full_method, bytes) else full_method
    service, _, method = text.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every rpc by method and final status code, and times it.

    `tandem:rpcs_total{method,code}`, `tandem:rpc_errors_total{method,code}` (code != OK) and
    `tandem:rpc_duration_seconds{method}`. Health and reflection rpcs are not counted: probes
    would drown the real traffic.
    """

    IGNORED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._rpcs = counter(RPCS, registry=registry)
        self._errors = counter(RPC_ERRORS, registry=registry)
        self._duration = histogram(RPC_DURATION, registry=registry)

    def _record(self, method: str, code: str, start: float) -> None:
        self._rpcs.labels(method=method, code=code).inc()
        if code != "OK":
            self._errors.labels(method=method, code=code).inc()
        self._duration.labels(method=method).observe(time.perf_counter() - start)

    def _final_code(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
        code = None
        try:
            code = context.code()
        except (AttributeError, NotImplementedError):  # pragma: no cover - old grpcio
            code = None
        if code is not None and code != grpc.StatusCode.OK:
            return _code_name(code)
        if isinstance(error, asyncio.CancelledError):
            return "CANCELLED"
        if error is not None:
            return "UNKNOWN"
        return _code_name(code)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        text = full_method.decode() if isinstance(full_method, bytes) else full_method
        if handler is None or text.startswith(self.IGNORED_PREFIXES):
            return handler
        method = _short_method(text)
        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                error: BaseException | None = None
                try:
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:
                        await result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._record(method, self._final_code(context, error), start)

            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return make(streaming, handler.request_deserializer, handler.response_serializer)

        unary_behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                return await unary_behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(method, self._final_code(context, error), start)

        make_unary = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make_unary(unary, handler.request_deserializer, handler.response_serializer)
