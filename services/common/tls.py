"""Mutual TLS between tandem's services.

With `--tls-cert`, `--tls-key` and `--tls-ca` set, a service's gRPC server requires a client
certificate signed by the CA (plaintext and unknown clients are refused at the handshake), and its
gRPC clients present their own certificate and verify the peer against the same CA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

# A unix socket has no host name, and gRPC would check the server's certificate against the
# percent-encoded socket path; over unix sockets the certificate must name this host instead.
UNIX_SOCKET_SERVER_NAME = "localhost"


def secure_channel_options(address: str) -> Sequence[tuple[str, str]]:
    """Extra channel options for a TLS channel to `address` (the server name over unix sockets)."""
    if address.startswith("unix:"):
        return (("grpc.ssl_target_name_override", UNIX_SOCKET_SERVER_NAME),)
    return ()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one service's identity and the CA that signs its peers."""

    cert: str
    key: str
    ca: str

    @staticmethod
    def from_options(cert: str, key: str, ca: str) -> TlsFiles | None:
        """None when all three are empty; ValueError naming the missing option when only some are set."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise ValueError(
                f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}"
            )
        for name, value in given.items():
            if not Path(value).is_file():
                raise ValueError(f"{name}: no such file {value!r}")
        return TlsFiles(cert, key, ca)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
