"""What a decode worker's KV fetches achieved, per prefill worker and transport (since start).

The decode side is the one that knows the pair: its own address and the prefill worker's (the KV
handle's), and which transport the negotiation picked. `Info.kv_peer_transfers` lists these
entries and `/metrics` exports them with `peer` and `transport` labels (rpc.py), so an operator
sees whether a pair got CUDA IPC or fell back to gRPC, and at what rate.

Event loop only (the rpc that fetched records it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common import metrics
from services.worker.kv_transfer import FetchStats


def gb_per_s(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9 if seconds > 0 else 0.0


@dataclass
class PeerTransfers:
    peer_address: str
    transport: str
    num_transfers: int = 0  # completed
    num_failed: int = 0
    num_bytes: int = 0  # of the completed ones
    seconds: float = 0.0
    last_bytes: int = 0
    last_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return gb_per_s(self.num_bytes, self.seconds)

    @property
    def last_gb_per_s(self) -> float:
        return gb_per_s(self.last_bytes, self.last_seconds)


class PeerTransferLog:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], PeerTransfers] = {}

    def record(self, address: str, stats: FetchStats) -> PeerTransfers:
        key = (address, stats.transport)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = PeerTransfers(address, stats.transport)
        labels = {"peer": address, "transport": stats.transport}
        if not stats.ok:
            entry.num_failed += 1
            metrics.counter(metrics.KV_PEER_FAILURES).labels(**labels).inc()
            return entry
        entry.num_transfers += 1
        entry.num_bytes += stats.num_bytes
        entry.seconds += stats.seconds
        entry.last_bytes, entry.last_seconds = stats.num_bytes, stats.seconds
        metrics.counter(metrics.KV_PEER_BYTES).labels(**labels).inc(stats.num_bytes)
        metrics.counter(metrics.KV_PEER_SECONDS).labels(**labels).inc(max(stats.seconds, 0.0))
        metrics.gauge(metrics.KV_PEER_GBPS).labels(**labels).set(entry.last_gb_per_s)
        return entry

    def entries(self) -> list[PeerTransfers]:
        return list(self._entries.values())
