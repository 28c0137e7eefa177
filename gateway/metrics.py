"""Prometheus metrics of one gateway (a per-app registry, so tests can run several apps).

Names are part of the deployment docs; change them only together with those.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem:requests",  # exposed as tandem:requests_total
            "Requests by route, HTTP status and finish reason.",
            ["route", "status", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "tandem:time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem:inter_token_latency_seconds",
            "Time between successive token chunks of a choice.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem:e2e_request_latency_seconds",
            "Time from request arrival to its last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tandem:generation_tokens", "Tokens generated.", registry=r)
        self.running = Gauge("tandem:requests_running", "Requests generating tokens.", registry=r)
        self.waiting = Gauge(
            "tandem:requests_waiting", "Requests admitted but without their first token yet.", registry=r
        )
        self.worker_requests = Counter(
            "tandem:worker_requests", "Generate calls sent to each worker.", ["worker"], registry=r
        )

    def count_request(self, route: str, status: int, finish_reason: str = "") -> None:
        self.requests.labels(route=route, status=str(status), finish_reason=finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
