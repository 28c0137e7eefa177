"""The adapters a worker serves, by name: loaded from disk on the caller's thread (the gRPC
servicer's, off the engine thread), looked up by the engine when a request names one.

Unloading only forgets the name: requests already running keep their adapter object (it stays in
host memory while they do, and in its device slot until the pool recycles it), new requests of
that name are refused (NOT_FOUND).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from services.worker.lora.adapter import LoRAAdapter, LoRAAdapterError, ModelShapes, load_adapter


class LoRANotFoundError(LookupError):
    """A request or an unload names an adapter this worker does not serve (gRPC NOT_FOUND)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"LoRA adapter {name!r} is not loaded on this worker")
        self.name = name


@dataclass(frozen=True)
class LoRAInfo:
    name: str
    path: str
    rank: int
    digest: str  # the adapter's content hash; its prefix-cache root (adapter.py lora_root_hash)


class LoRARegistry:
    def __init__(
        self,
        shapes: ModelShapes | None,
        max_rank: int,
        max_loras: int,
        share: Callable[[LoRAAdapter], None] | None = None,
    ) -> None:
        self.shapes = shapes  # None: LoRA is off on this worker
        self.max_rank = max_rank
        self.max_loras = max_loras
        # Rank 0 of a parallel group: the other ranks load their shards of each adapter this one
        # loaded (services/worker/tp_group.py StepDriver.share_lora); raises LoRAAdapterError.
        self.share = share
        self._adapters: dict[str, LoRAAdapter] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.shapes is not None

    def load(self, name: str, path: str) -> LoRAInfo:
        """Read, check and register an adapter; raises LoRAAdapterError (bad adapter or name)."""
        if self.shapes is None:
            raise LoRAAdapterError(
                "LoRA is off on this worker (start it with --enable-lora or --lora-modules)"
            )
        with self._lock:
            if name in self._adapters:
                raise LoRAAdapterError(f"adapter {name!r} is already loaded (unload it first)")
        adapter = load_adapter(name, path, self.shapes, self.max_rank)
        if self.share is not None:
            self.share(adapter)
        with self._lock:
            if name in self._adapters:  # (a concurrent load of the same name won)
                raise LoRAAdapterError(f"adapter {name!r} is already loaded (unload it first)")
            self._adapters[name] = adapter
        return _info(adapter)

    def unload(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise LoRANotFoundError(name)

    def get(self, name: str) -> LoRAAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise LoRANotFoundError(name)
        return adapter

    def list(self) -> list[LoRAInfo]:
        with self._lock:
            return [_info(a) for a in self._adapters.values()]


def _info(adapter: LoRAAdapter) -> LoRAInfo:
    return LoRAInfo(adapter.name, adapter.path, adapter.rank, adapter.digest)
