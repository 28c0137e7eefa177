"""The NIXL data path: the decode worker reads the prompt's KV straight out of the prefill
worker's cache memory (NIXL's UCX backend: RDMA between hosts, shared memory or TCP otherwise).

    each worker, at start-up       one NIXL agent; its whole KV cache tensor registered once
    prefill worker P (FetchKV)     per ready span (layers x blocks): a KVChunk naming the span and
                                   P's block ids (the first also carries P's agent metadata, its
                                   cache's address and block count); its stream stays open
    decode worker D                adds P's agent once, reads each span into its reserved blocks
                                   (one NIXL READ of the span's regions, coalesced where blocks
                                   are consecutive on both sides), then closes the stream, which
                                   is when P frees the blocks

The gRPC stream stays the control plane (negotiation, spans, the layer-wise end with the first
token); only the bytes move over NIXL. Both caches have the same layout (equal fingerprints):
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so a (layer, k/v, block) region
is one contiguous run of `block_bytes` at a known offset; only the block counts differ.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from services.worker.kv_cache import block_runs

log = logging.getLogger(__name__)

# Seconds one span's READ may take before the fetch fails (the decode worker then recomputes).
READ_TIMEOUT_S = 30.0


@functools.cache
def import_error() -> str:
    """Why the nixl package cannot be used here ("" = it imports and has the UCX plugin)."""
    try:
        import nixl._api  # noqa: F401
    except Exception as exc:  # ImportError, or a missing shared library of its wheels
        return f"the nixl package does not import ({type(exc).__name__}: {exc})"
    return ""


@dataclass(frozen=True)
class NixlRemote:
    """Where a peer's KV cache is, for NIXL reads (the first NIXL KVChunk of a fetch)."""

    agent_name: str
    agent_metadata: bytes  # NIXL's own description of the agent (its UCX worker address, ...)
    base_address: int  # the peer's cache tensor's address
    num_blocks: int  # the peer's cache's block count (its layer stride)
    device_id: int
    on_gpu: bool


class NixlEndpoint:
    """This worker's NIXL agent with its KV cache registered (created once, at start-up)."""

    def __init__(self, kv: torch.Tensor) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.kv = kv
        self.name = f"tandem-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=["UCX"]))
        if "UCX" not in self.agent.backends:
            raise RuntimeError("NIXL has no UCX backend here")
        self.registered = self.agent.register_memory(kv)  # kept: registered until the process ends
        self.metadata = self.agent.get_agent_metadata()
        self.mem_type = "VRAM" if kv.device.type == "cuda" else "DRAM"
        self.device_id = (kv.device.index or 0) if kv.device.type == "cuda" else 0
        self.num_blocks = kv.shape[2]
        self.block_bytes = kv[0, 0, 0].numel() * kv.element_size()
        self._peers: dict[str, str] = {}  # agent name -> NIXL's name for it (added once)
        self._lock = threading.Lock()

    def describe(self) -> NixlRemote:
        return NixlRemote(
            self.name,
            self.metadata,
            self.kv.data_ptr(),
            self.num_blocks,
            self.device_id,
            self.kv.device.type == "cuda",
        )

    def read(
        self,
        remote: NixlRemote,
        layers: tuple[int, int],
        remote_blocks: tuple[int, ...],
        local_blocks: tuple[int, ...],
        timeout_s: float = READ_TIMEOUT_S,
    ) -> int:
        """Blocking: copy layers [l0, l1) of the peer's `remote_blocks` into this cache's
        `local_blocks` with one NIXL READ; returns the bytes. Raises RuntimeError on failure."""
        if len(remote_blocks) != len(local_blocks):
            raise ValueError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local ones")
        peer = self._peer(remote)
        local_regions: list[tuple[int, int, int]] = []
        remote_regions: list[tuple[int, int, int]] = []
        local_base = self.kv.data_ptr()
        size = self.block_bytes
        for layer in range(*layers):
            for half in (0, 1):
                for start, count in block_runs(remote_blocks, local_blocks):
                    r_block, l_block = remote_blocks[start], local_blocks[start]
                    r_addr = remote.base_address + ((layer * 2 + half) * remote.num_blocks + r_block) * size
                    l_addr = local_base + ((layer * 2 + half) * self.num_blocks + l_block) * size
                    remote_regions.append((r_addr, count * size, remote.device_id))
                    local_regions.append((l_addr, count * size, self.device_id))
        local = self.agent.get_xfer_descs(local_regions, self.mem_type)
        remote_descs = self.agent.get_xfer_descs(remote_regions, "VRAM" if remote.on_gpu else "DRAM")
        handle = self.agent.initialize_xfer("READ", local, remote_descs, peer)
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            pause = 1e-5
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NIXL read from {remote.agent_name} took more than {timeout_s:g} s")
                time.sleep(pause)  # the transfer progresses on NIXL's thread; this one only waits
                pause = min(pause * 2, 1e-3)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL read from {remote.agent_name} failed ({state})")
        finally:
            self.agent.release_xfer_handle(handle)
        return sum(r[1] for r in local_regions)

    def _peer(self, remote: NixlRemote) -> str:
        with self._lock:
            name = self._peers.get(remote.agent_name)
            if name is None:
                name = self._peers[remote.agent_name] = self.agent.add_remote_agent(remote.agent_metadata)
            return name


def create(kv: torch.Tensor) -> tuple[NixlEndpoint | None, str]:
    """This worker's endpoint, or None and why not (logged by the caller)."""
    reason = import_error()
    if reason:
        return None, reason
    try:
        return NixlEndpoint(kv), ""
    except Exception as exc:  # no UCX transport usable here, registration refused, ...
        return None, f"NIXL could not start ({type(exc).__name__}: {exc})"
