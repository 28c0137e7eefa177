"""The gateway's configuration (`tandem gateway --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.common.tls import TlsFiles


@dataclass(frozen=True)
class GatewayConfig:
    """The OpenAI-compatible HTTP gateway in front of a styler and one or more workers."""

    host: str = "127.0.0.1"
    """HTTP listen host (0.0.0.0 for every interface)."""
    port: int = 8000
    """HTTP listen port (0 picks a free one; the chosen port is logged)."""
    grpc_port: int = 0
    """Port of the public gRPC Inference API on the same host (0 = off)."""
    styler: list[str] = field(default_factory=list)
    """gRPC address of a styler (host:port or unix:/path); repeat for several replicas."""
    worker: list[str] = field(default_factory=list)
    """gRPC address of a worker (host:port, unix:/path, or dns:HOST:PORT for every address HOST resolves to, e.g. a Kubernetes headless Service, openengine:HOST:PORT for any engine that serves OpenEngine, or smg:HOST:PORT for one that serves SMG's vllm_engine proto, see docs/protocols.md); repeat for several workers."""
    prefill_worker: list[str] = field(default_factory=list)
    """Disaggregated mode: gRPC address of a prefill worker (--role prefill); repeatable."""
    decode_worker: list[str] = field(default_factory=list)
    """Disaggregated mode: gRPC address of a decode worker (--role decode); repeatable."""
    encode_worker: list[str] = field(default_factory=list)
    """gRPC address of an encode worker (--role encode: an image-in model's vision encoder); repeatable. With any, each image prompt's images are encoded there before its Generate (docs/multimodal.md)."""
    routing: Literal["exact", "affinity"] = "exact"
    """How a worker is chosen for a prompt: exact = by each worker's prefix cache as its KV events tell (the fewest blocks to prefill plus load), falling back to affinity where the events are not known; affinity = least load, preferring the worker that served the same prefix before (a guess from this gateway's history; no KV event subscriptions). docs/disaggregation.md, "KV events and exact prefix routing"."""
    kv_layerwise_push: bool = True
    """Disaggregated mode: start the decode worker as soon as the prefill worker admitted the prompt, so that it fetches each layer's KV while the later layers are computed (when both workers offer it; prompt logprobs and n > 1 prefill first as before)."""
    api_key: list[str] = field(default_factory=list)
    """Accepted bearer token(s); when any is set, requests without one of them get 401."""
    api_key_file: str = ""
    """File of accepted API keys, one per line (`KEY [rpm=N] [tpm=N]`; # starts a comment)."""
    rate_limit_requests: int = 0
    """Requests per minute each API key may send (0 = no limit; a key-file rpm= overrides it)."""
    rate_limit_tokens: int = 0
    """Prompt + completion tokens per minute each API key may use (0 = no limit; tpm= overrides)."""
    ssl_certfile: str = ""
    """PEM certificate (chain) for HTTPS on --port ("" = plain HTTP)."""
    ssl_keyfile: str = ""
    """PEM private key matching --ssl-certfile."""
    allowed_media_domains: list[str] = field(default_factory=list)
    """Hosts whose http(s) image URLs the gateway fetches (and their subdomains); others are 400s. data: URLs always work."""
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest HTTP request body accepted; bigger bodies get 413."""
    max_connections: int = 4096
    """Open HTTP connections at once; past it an idle one is closed for the newcomer, or 503 when none is idle (lowered to the descriptor limit less 256)."""
    idle_timeout: float = 15.0
    """Seconds a connection may take to send a complete request head, from its opening or the end of its previous response; then it is closed."""
    body_timeout: float = 60.0
    """Seconds a request may take to send its whole body once its head arrived; then 408."""
    max_waiting: int = 1024
    """Largest number of sequences (prompts x n of each request) waiting for their first token; beyond it new requests get 429."""
    max_sequences_per_request: int = 256
    """Largest prompts x n in one request (vLLM's default --max-num-seqs: one engine batch); more get 400."""
    max_running: int = 0
    """Requests in flight at once before further ones wait (0 = no gateway-side limit)."""
    max_waiting_tokens: int = 0
    """Largest number of prompt tokens waiting for their first token; beyond it 429 (0 = no limit)."""
    max_prompt_tokens: int = 0
    """Largest prompt (tokens) a request may send; longer ones get 400 (0 = the model's context)."""
    max_tokens: int = 0
    """Largest max_tokens a request may ask for, and the default when it asks none (0 = the context)."""
    max_logprobs: int = 20
    """Largest top_logprobs (chat) / logprobs (completions) a request may ask for."""
    max_tools: int = 128
    """Largest number of tools in one chat request."""
    strict_tools: Literal["auto", "always", "never"] = "auto"
    """Strict tool calls in tool_choice "auto" (a call the model starts is always a valid call of a listed tool, docs/gateway.md): auto = when a listed function has "strict": true; always = every request with tools; never = off."""
    request_timeout: float = 600.0
    """Seconds a request may take end to end (0 = no limit); X-Request-Timeout / gRPC deadlines may lower it."""
    drain_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM (/health says 503 meanwhile)."""
    log_requests: bool = False
    """Log prompts and outputs (off by default: they may hold personal data)."""
    responses_db: str = "~/.local/state/tandem/responses.sqlite3"
    """SQLite file of stored Responses (`store: true`, `previous_response_id`); "" = storing off."""
    responses_ttl: float = 30 * 24 * 3600.0
    """Seconds a stored Response is kept (30 days, as OpenAI keeps them)."""
    served_model_name: str = ""
    """Model name clients use ("" = the name the workers report)."""
    max_stop_strings: int = 16
    """Largest number of stop strings in one request."""
    max_n: int = 16
    """Largest `n` (choices per request)."""
    expose_internal_addresses: bool = False
    """Name the styler and workers by their addresses (socket paths, host:port) in /health and /metrics; off: by name (styler-0, worker-1), since both routes need no API key."""
    instance_id: str = ""
    """Token /health reports as "instance" ("" = none): `tandem up` sets a new one per start, so its readiness probe knows it reached its own gateway."""
    health_interval: float = 1.0
    """Seconds between background health / load polls of each downstream service."""
    tls_cert: str = ""
    """PEM certificate the gateway presents to the styler and workers for mutual TLS ("" = plaintext)."""
    tls_key: str = ""
    """PEM private key matching --tls-cert."""
    tls_ca: str = ""
    """PEM CA bundle that signs the styler's and workers' certificates."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["text", "json"] = "text"
    """Log line format: text for people, json (one object per line) for log pipelines."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"--grpc-port must be in 0..65535, got {self.grpc_port}")
        if self.max_request_bytes <= 0:
            raise ValueError(f"--max-request-bytes must be > 0, got {self.max_request_bytes}")
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if self.max_running < 0:
            raise ValueError(f"--max-running must be >= 0, got {self.max_running}")
        if self.max_sequences_per_request < 1:
            raise ValueError(
                f"--max-sequences-per-request must be >= 1, got {self.max_sequences_per_request}"
            )
        if self.max_n < 1:
            raise ValueError(f"--max-n must be >= 1, got {self.max_n}")
        if self.health_interval <= 0:
            raise ValueError(f"--health-interval must be > 0, got {self.health_interval}")
        for name in (
            "max_waiting_tokens",
            "max_prompt_tokens",
            "max_tokens",
            "max_logprobs",
            "max_tools",
            "rate_limit_requests",
            "rate_limit_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_connections < 0:
            raise ValueError(f"--max-connections must be >= 0, got {self.max_connections}")
        for name in ("idle_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.request_timeout < 0:
            raise ValueError(f"--request-timeout must be >= 0, got {self.request_timeout}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        for name in ("ssl_certfile", "ssl_keyfile", "api_key_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: no such file {value!r}")
        if self.prefill_worker and not (self.decode_worker or self.worker):
            raise ValueError("--prefill-worker needs at least one --decode-worker (or --worker) to decode")
        for name in ("prefill_worker", "decode_worker", "encode_worker"):
            for address in getattr(self, name):
                if address.startswith(("openengine:", "smg:")):
                    raise ValueError(
                        f"--{name.replace('_', '-')} {address}: this role needs tandem's worker proto; "
                        "an OpenEngine or SMG engine goes in --worker"
                    )
        for address in self.worker:
            for prefix in ("openengine:", "smg:"):
                if address.startswith(prefix) and not address.removeprefix(prefix):
                    raise ValueError(f"--worker {prefix}HOST:PORT needs the engine's address")
        TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def tls(self) -> TlsFiles | None:
        """The mutual-TLS identity towards the styler and workers (None = plaintext)."""
        return TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)
