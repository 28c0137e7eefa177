"""Options every gRPC service shares (listen address, logging, drain)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.tls import TlsFiles


@dataclass(frozen=True)
class ServiceConfig:
    """Options shared by every tandem gRPC service."""

    address: str = "127.0.0.1:0"
    """gRPC listen address: host:port (port 0 picks a free port) or unix:/path/to.sock."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["text", "json"] = "text"
    """Log line format: text for people, json (one object per line) for log pipelines."""
    drain_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM before the service exits."""
    tls_cert: str = ""
    """PEM certificate of this service for mutual TLS (with --tls-key and --tls-ca; "" = plaintext)."""
    tls_key: str = ""
    """PEM private key matching --tls-cert."""
    tls_ca: str = ""
    """PEM CA bundle that signs the other services' certificates; clients without one are refused."""
    metrics_port: int = 0
    """Port of a Prometheus /metrics HTTP endpoint on the --address host (127.0.0.1 for a unix socket; 0 = off)."""

    def __post_init__(self) -> None:
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def tls(self) -> TlsFiles | None:
        """The mutual-TLS files, or None for plaintext."""
        return TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)
