"""Prometheus metrics of one gateway, on a per-app registry (tests run several apps).

Names, labels and buckets come from `services/common/metrics.py`, which documents every
tandem metric for the deployment docs and dashboards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.detokenize_mux import MuxCounts
from gateway.generate_mux import GenerateMuxCounts
from services.common import gc_heap
from services.common import metrics as names

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _help(name: str) -> str:
    spec = names.SPECS.get(name)
    return spec.help if spec else name


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            names.REQUESTS.removesuffix("_total"),
            _help(names.REQUESTS),
            ["route", "status", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            names.TIME_TO_FIRST_TOKEN,
            _help(names.TIME_TO_FIRST_TOKEN),
            buckets=names.TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            names.INTER_TOKEN_LATENCY, _help(names.INTER_TOKEN_LATENCY), buckets=names.ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            names.E2E_REQUEST_LATENCY, _help(names.E2E_REQUEST_LATENCY), buckets=names.E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(
            names.PROMPT_TOKENS.removesuffix("_total"), _help(names.PROMPT_TOKENS), registry=r
        )
        self.generation_tokens = Counter(
            names.GENERATION_TOKENS.removesuffix("_total"), _help(names.GENERATION_TOKENS), registry=r
        )
        self.running = Gauge(names.REQUESTS_RUNNING, _help(names.REQUESTS_RUNNING), registry=r)
        self.waiting = Gauge(names.REQUESTS_WAITING, _help(names.REQUESTS_WAITING), registry=r)
        self.worker_requests = Counter(
            "tandem:gateway_worker_requests",
            "Generate calls the gateway sent to each worker.",
            ["worker"],
            registry=r,
        )
        r.register(gc_heap.PAUSE_COLLECTOR)  # the process's garbage collections, timed

    def track_queues(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running / waiting gauges from the admission gate at each scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def track_styler_streams(self, counts: Callable[[], MuxCounts]) -> None:
        """Read the styler detokenize streams' message counts at each scrape."""
        self.registry.register(_StylerStreamCollector(counts))

    def track_worker_streams(self, counts: Callable[[], GenerateMuxCounts]) -> None:
        """Read the workers' GenerateMany streams' message counts at each scrape."""
        self.registry.register(_WorkerStreamCollector(counts))

    def track_exact_routes(self, routes: Callable[[], dict[str, int]]) -> None:
        """Read the routers' exact picks (by the workers' KV events) by pool at each scrape."""
        self.registry.register(_ExactRouteCollector(routes))

    def count_request(self, route: str, status: int, finish_reason: str = "") -> None:
        self.requests.labels(route=route, status=str(status), finish_reason=finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StylerStreamCollector(Collector):
    """Messages on the styler DetokenizeMany streams: session messages per sent message is how
    much the writer batches (1 when idle, up to one per running request under load)."""

    def __init__(self, counts: Callable[[], MuxCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        messages = CounterMetricFamily(
            "tandem:gateway_styler_stream_messages",
            "Messages on the styler detokenize streams (DetokenizeMany), by direction.",
            labels=["direction"],
        )
        messages.add_metric(["sent"], counts.messages_sent)
        messages.add_metric(["received"], counts.messages_received)
        yield messages
        sessions = CounterMetricFamily(
            "tandem:gateway_styler_session_messages",
            "Session messages (start, token deltas, close, cancel) the sent styler stream messages carried.",
        )
        sessions.add_metric([], counts.session_messages_sent)
        yield sessions


class _WorkerStreamCollector(Collector):
    """Messages on the workers' GenerateMany streams: session answers (chunks) per received
    message is how much the worker batches (1 when one request runs, up to one per running
    request under load)."""

    def __init__(self, counts: Callable[[], GenerateMuxCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        messages = CounterMetricFamily(
            "tandem:gateway_worker_stream_messages",
            "Messages on the workers' generate streams (GenerateMany), by direction.",
            labels=["direction"],
        )
        messages.add_metric(["sent"], counts.messages_sent)
        messages.add_metric(["received"], counts.messages_received)
        yield messages
        sessions = CounterMetricFamily(
            "tandem:gateway_worker_session_messages",
            "Session messages in the workers' generate stream messages: starts and cancels sent, "
            "chunks and ends received.",
            labels=["direction"],
        )
        sessions.add_metric(["sent"], counts.session_messages_sent)
        sessions.add_metric(["received"], counts.session_messages_received)
        yield sessions


class _ExactRouteCollector(Collector):
    """Worker picks the KV index decided (--routing exact with live event streams), by pool; the
    other picks of `tandem:gateway_worker_requests_total` were least load with prefix affinity."""

    def __init__(self, routes: Callable[[], dict[str, int]]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tandem:gateway_exact_routes",
            "Worker picks decided by the workers' KV events (exact prefix routing), by pool.",
            labels=["pool"],
        )
        for pool, count in self._routes().items():
            family.add_metric([pool], count)
        yield family
