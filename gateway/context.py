"""What every front end (HTTP routes, the gRPC Inference service) shares in one gateway process."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.admission import AdmissionGate
from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.disaggregation import Disaggregation
from gateway.drain import HttpDrain
from gateway.encoder_pool import EncoderPool
from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.rate_limit import RateLimiter
from gateway.router import Router
from gateway.styler_pool import StylerPool
from gateway.token_texts import TokenTexts


@dataclass
class GatewayContext:
    config: GatewayConfig
    router: Router
    stylers: StylerPool
    metrics: Metrics
    gate: AdmissionGate
    token_texts: TokenTexts
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    limits: Limits = field(default_factory=Limits)
    drain: HttpDrain = field(default_factory=HttpDrain)
    disagg: Disaggregation | None = None  # the prefill pool (--prefill-worker), when disaggregated
    encoders: EncoderPool | None = None  # the encode workers (--encode-worker), when any
    started_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, config: GatewayConfig) -> GatewayContext:
        tls = config.tls
        credentials = tls.channel_credentials() if tls is not None else None
        stylers = StylerPool(config.styler, config.health_interval, credentials)
        return cls(
            config=config,
            # decode workers serve Generate like unified ones; prefill workers form their own pool
            router=Router(
                [*config.worker, *config.decode_worker],
                config.health_interval,
                credentials,
                exact=config.routing == "exact",
            ),
            disagg=Disaggregation(
                config.prefill_worker,
                config.health_interval,
                credentials,
                config.kv_layerwise_push,
                exact=config.routing == "exact",
            )
            if config.prefill_worker
            else None,
            encoders=EncoderPool(config.encode_worker, credentials) if config.encode_worker else None,
            stylers=stylers,
            metrics=Metrics(),
            gate=AdmissionGate(config.max_waiting, config.max_running, config.max_waiting_tokens),
            token_texts=TokenTexts(stylers),
            keys=KeyRing.from_config(
                config.api_key, config.api_key_file, config.rate_limit_requests, config.rate_limit_tokens
            ),
            limits=Limits.from_config(config),
        )

    def __post_init__(self) -> None:
        self.metrics.track_queues(lambda: self.gate.num_running, lambda: self.gate.num_waiting)
        self.metrics.track_styler_streams(self.stylers.detokenize_counts)
        self.metrics.track_worker_streams(lambda: self.router.generate_counts)
        self.metrics.track_exact_routes(self._exact_routes)

    def _exact_routes(self) -> dict[str, int]:
        """Picks the KV index decided, by pool: `worker` (unified or decode), `prefill_worker`."""
        routes = {"worker": self.router.num_exact_routes}
        if self.disagg is not None:
            routes["prefill_worker"] = self.disagg.prefill.num_exact_routes
        return routes

    async def start(self) -> None:
        await asyncio.gather(self.router.start(), self.stylers.start())
        if self.disagg is not None:
            await self.disagg.start(self.router)  # says at start-up which pairs cannot exchange KV

    async def close(self) -> None:
        await asyncio.gather(self.router.close(), self.stylers.close())
        if self.disagg is not None:
            await self.disagg.close()
        if self.encoders is not None:
            await self.encoders.close()

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        info = self.router.info()
        if info is not None and info.model_name:
            return info.model_name
        if self.stylers.info is not None and self.stylers.info.model_name:
            return self.stylers.info.model_name
        return "default"

    @property
    def max_model_len(self) -> int:
        info = self.router.info()
        if info is not None and info.max_model_len:
            return info.max_model_len
        if self.stylers.info is not None:
            return self.stylers.info.max_model_len
        return 0

    def label(self, name: str, address: str) -> str:
        """How /health and /metrics name a downstream service: by name, or by its address when
        --expose-internal-addresses is on (both routes are open, and addresses are internal)."""
        return address if self.config.expose_internal_addresses else name

    async def health(self) -> dict[str, dict[str, bool]]:
        """Poll every downstream service now (name -> in rotation), so that a 200 from /health
        means requests are routable at once."""
        await asyncio.gather(self.router.poll_once(), self.stylers.poll_once())
        status = {
            "styler": {
                self.label(f"styler-{i}", address): ok
                for i, (address, ok) in enumerate(self.stylers.healthy.items())
            },
            "worker": {self.label(w.name, w.address): w.healthy for w in self.router.workers},
        }
        if self.disagg is not None:  # prefill workers are optional: decode workers can compute prompts
            await self.disagg.prefill.poll_once()
            status["prefill_worker"] = {
                self.label(w.name, w.address): w.healthy for w in self.disagg.prefill.workers
            }
        return status
