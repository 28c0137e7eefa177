"""The gateway's configuration (`tandem gateway --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """gRPC address of a worker (host:port or unix:/path); repeat for several workers."""
    api_key: list[str] = field(default_factory=list)
    """Accepted bearer token(s); when any is set, requests without one of them get 401."""
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest HTTP request body accepted; bigger bodies get 413."""
    max_waiting: int = 1024
    """Largest number of requests waiting for a worker; beyond it new requests get 429."""
    max_running: int = 0
    """Requests in flight at once before further ones wait (0 = no gateway-side limit)."""
    served_model_name: str = ""
    """Model name clients use ("" = the name the workers report)."""
    max_stop_strings: int = 16
    """Largest number of stop strings in one request."""
    max_n: int = 16
    """Largest `n` (choices per request)."""
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
        if self.max_n < 1:
            raise ValueError(f"--max-n must be >= 1, got {self.max_n}")
        if self.health_interval <= 0:
            raise ValueError(f"--health-interval must be > 0, got {self.health_interval}")
        TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def tls(self) -> TlsFiles | None:
        """The mutual-TLS identity towards the styler and workers (None = plaintext)."""
        return TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)
