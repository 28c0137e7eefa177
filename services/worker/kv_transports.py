"""Which transport a FetchKV uses, and the CUDA IPC side of moving KV (kv_transfer.py moves it).

    decode worker D ── FetchKV(handle, transports=[D's preferences], host_id) ──▶ prefill worker P
    P picks the first of D's preferences it supports too (`choose`) and says which in its first
    KVChunk: gRPC (the chunks carry the bytes) or CUDA IPC (one chunk naming P's cache tensor and
    the blocks; D maps the tensor once, copies the blocks device to device, then closes the stream,
    which is when P frees them).

Order, fastest first: CUDA IPC (both ends on one host with CUDA), NIXL (kv_nixl.py: the decode
worker reads the blocks out of the prefill worker's registered cache; needs the `nixl` package,
`pip install 'tandem[nixl]'`; offered by `auto` on CUDA, on the CPU only with `--kv-transport
nixl`, and only when the worker's NIXL agent started: otherwise a log line says why), gRPC
(always).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import pickle
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Transport = Literal["cuda-ipc", "nixl", "grpc"]
ORDER: tuple[Transport, ...] = ("cuda-ipc", "nixl", "grpc")


@functools.cache
def host_id() -> str:
    """This machine's identity for CUDA IPC pairing: the kernel's boot id (changes on reboot, equal
    for every process and container sharing the kernel), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def nixl_installed() -> bool:
    return importlib.util.find_spec("nixl") is not None


def unavailable_reason(
    transport: Transport, device: torch.device, setting: str = "auto", world_size: int = 1
) -> str:
    """Why this worker (a group of `world_size` ranks) cannot use `transport` under `--kv-transport
    setting` ("" = it can; NIXL still needs its agent to start, kv_nixl.create)."""
    if transport == "cuda-ipc" and device.type != "cuda":
        return f"CUDA IPC needs a CUDA device (this worker runs on {device.type})"
    if transport == "cuda-ipc" and world_size > 1:
        # the handle names one tensor; a group's KV is spread over its ranks (kv_reshard.py)
        return "CUDA IPC moves one rank's cache; this worker is a parallel group"
    if transport == "nixl":
        if world_size > 1:  # (its agent registers rank 0's cache tensor only)
            return "NIXL moves one rank's cache; this worker is a parallel group"
        if not nixl_installed():
            return "the nixl package is not installed (pip install 'tandem[nixl]')"
        if device.type != "cuda" and setting != "nixl":
            return "NIXL on the CPU only with --kv-transport nixl"
    return ""


def supported(device: torch.device, setting: str = "auto", world_size: int = 1) -> tuple[Transport, ...]:
    """The transports this worker can serve and use, fastest first."""
    return tuple(t for t in ORDER if not unavailable_reason(t, device, setting, world_size))


def preferences(
    setting: str, available: Sequence[Transport], device: torch.device, world_size: int = 1
) -> tuple[Transport, ...]:
    """What a decode worker asks for under `--kv-transport setting`: auto = everything available,
    fastest first; a named transport first (when available here), then gRPC; grpc = gRPC only."""
    if setting == "auto":
        return tuple(t for t in ORDER if t in available)
    if setting == "grpc":
        return ("grpc",)
    if setting not in available:
        reason = unavailable_reason(setting, device, setting, world_size) or "its NIXL agent did not start"  # type: ignore[arg-type]
        log.warning("--kv-transport %s: %s; using gRPC", setting, reason)
        return ("grpc",)
    return (setting, "grpc")  # type: ignore[return-value]


def choose(
    wanted: Sequence[Transport], caller_host: str, available: Sequence[Transport], own_host: str
) -> Transport:
    """The prefill side's pick: the caller's first preference it supports too (CUDA IPC only when
    both are on one host); gRPC when nothing else fits (every worker speaks it)."""
    for transport in wanted:
        if transport == "grpc":
            return "grpc"
        if transport not in available:
            continue
        if transport == "cuda-ipc" and (not caller_host or caller_host != own_host):
            continue
        return transport
    return "grpc"


# ---- CUDA IPC ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedTensor:
    """A cache tensor as another process on this host can map it."""

    tensor_id: str  # "<host>:<pid>:<uuid>"
    handle: bytes  # pickled torch CUDA IPC handle; b"" for a CPU tensor (same process only)


# Tensors this process exported, by id: a decode worker in the same process (tests, or two workers
# in one process) reads them directly; CUDA cannot open its own IPC handle.
_EXPORTED: dict[str, torch.Tensor] = {}
# Tensors of other processes this one mapped, by id: each is opened once.
_IMPORTED: dict[str, torch.Tensor] = {}
_SHARED: dict[str, SharedTensor] = {}
_lock = threading.Lock()


def export_tensor(tensor: torch.Tensor) -> SharedTensor:
    """Share `tensor` (the whole KV cache, alive as long as the process): its IPC handle is made
    once and reused for every fetch."""
    with _lock:
        for tensor_id, known in _EXPORTED.items():
            if known is tensor:
                return _SHARED[tensor_id]
        tensor_id = f"{host_id()}:{os.getpid()}:{uuid.uuid4().hex}"
        handle = b""
        if tensor.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            rebuild, args = reduce_tensor(tensor)
            handle = pickle.dumps((rebuild.__name__, args))
        shared = SharedTensor(tensor_id, handle)
        _EXPORTED[tensor_id] = tensor
        _SHARED[tensor_id] = shared
        return shared


_HANDLE_GLOBALS = frozenset(
    {
        ("torch", "Tensor"),
        ("torch._tensor", "Tensor"),
        ("torch", "Size"),
        ("torch", "UntypedStorage"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        ("torch", "device"),
        ("torch", "float32"),
        ("torch", "bfloat16"),
        ("torch", "float16"),
        ("torch", "float8_e4m3fn"),
    }
)


class _HandleUnpickler(pickle.Unpickler):
    """Unpickles a CUDA IPC handle's arguments and nothing else (the bytes come from a peer)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _HANDLE_GLOBALS:
            raise pickle.UnpicklingError(f"a CUDA IPC handle may not name {module}.{name}")
        return super().find_class(module, name)


def import_tensor(shared: SharedTensor) -> torch.Tensor:
    """The tensor another worker exported: the same object in this process, else mapped over CUDA
    IPC (once per tensor id). Raises ValueError when it cannot be mapped."""
    with _lock:
        local = _EXPORTED.get(shared.tensor_id)
        if local is not None:
            return local
        mapped = _IMPORTED.get(shared.tensor_id)
        if mapped is not None:
            return mapped
    if not shared.handle:
        raise ValueError(f"tensor {shared.tensor_id} is not in this process and has no CUDA IPC handle")
    name, args = _HandleUnpickler(io.BytesIO(shared.handle)).load()
    if name != "rebuild_cuda_tensor":
        raise ValueError(f"unexpected CUDA IPC rebuild function {name!r}")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    tensor = rebuild_cuda_tensor(*args)
    with _lock:
        _IMPORTED[shared.tensor_id] = tensor
    return tensor


def gather_blocks(remote: torch.Tensor, block_ids: Sequence[int], layers: tuple[int, int]) -> torch.Tensor:
    """remote[l0:l1, :, block_ids] as a tensor on the remote tensor's device (a device-side copy)."""
    l0, l1 = layers
    first = block_ids[0]
    if list(block_ids) == list(range(first, first + len(block_ids))):
        return remote[l0:l1, :, first : first + len(block_ids)]
    return remote[l0:l1].index_select(2, torch.tensor(list(block_ids), device=remote.device))
