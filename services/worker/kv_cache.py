"""The paged KV cache tensor and how big it may be.

Layout (the kernel API, kernels/reference.py): ONE tensor per worker

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (index 0 = K, 1 = V)

Layer l sees `kv_cache[l]`, shape [2, num_blocks, block_size, num_kv_heads, head_dim]. A token's
slot is `block_id * block_size + offset`. Disaggregation ships slices `kv_cache[l0:l1, :, blocks]`
in the model's layout (`read_blocks` / `write_blocks`: every layer and KV head of the model; a
parallel group's rank 0 gathers and scatters its ranks' parts, kv_reshard.py).
Block ids are handed out by the BlockManager; this file only owns the memory.

Sizing: `--kv-cache-memory` bytes when given; else on CUDA `gpu_memory_utilization` of the
device's memory minus what the weights and a profiling forward of a full token budget used; on
the CPU a fraction of the available host memory. Never more than every sequence slot could use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from services.worker.model_config import ModelConfig
from services.worker.parallel import shard_layout

log = logging.getLogger(__name__)

KV_LAYOUT = "[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]"
# The cache's element types by the names Info's kv_layout.dtype and FetchKV chunks give them.
KV_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",  # --kv-cache-dtype fp8
}


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    layout = shard_layout(cfg)  # this rank's layers and KV heads (all of them with T = P = 1)
    num_layers = layout.layer_end - layout.layer_start
    return num_layers * 2 * block_size * layout.num_kv_heads * cfg.head_dim * elem


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 4 << 30


class KVCache:
    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        # This rank's layers and KV heads (all of them with T = P = 1; services/worker/parallel.py)
        layout = shard_layout(cfg)
        num_layers = layout.layer_end - layout.layer_start
        shape = (num_layers, 2, num_blocks, block_size, layout.num_kv_heads, cfg.head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        # The whole model's cache, as FetchKV chunks see it (this tensor's shape with T = P = 1).
        self.model_shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        log.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB, %s)",
            num_blocks,
            block_size,
            self.tensor.numel() * self.tensor.element_size() / 2**20,
            dtype,
        )

    def layer(self, index: int) -> torch.Tensor:  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        return self.tensor[index]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-fork of a partial prompt block)."""
        if not copies:
            return
        pairs = torch.tensor(copies, device=self.tensor.device)  # [n, 2]: one host->device copy
        self.tensor[:, :, pairs[:, 1]] = self.tensor[:, :, pairs[:, 0]]

    def copy_block_tensors(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """copy_blocks with the block ids already on the device ([n] int64 each; no host wait):
        every layer's K and V of those blocks in one gather and one scatter. Every source is read
        before any destination is written: a block may be one copy's source and another's
        destination."""
        self.tensor.index_copy_(2, dst, self.tensor.index_select(2, src))

    def read_blocks(self, layer_start: int, layer_end: int, block_ids: tuple[int, ...]) -> torch.Tensor:
        """kv[layer_start:layer_end, :, block_ids] in the model's layout, on the host (a parallel
        group's read, DrivenKVCache; a single rank reads its tensor directly, kv_transfer.read_chunk)."""
        index = torch.tensor(block_ids, device=self.tensor.device)
        return self.tensor[layer_start:layer_end].index_select(2, index).cpu()

    def copy_blocks_from(
        self, src: torch.Tensor, src_ids: list[int], dst_ids: list[int], layers: tuple[int, int]
    ) -> None:
        """kv[l0:l1, :, dst_ids] = src[l0:l1, :, src_ids] for `src` another cache of this layout on
        this device (a prefill worker's, mapped over CUDA IPC). On CUDA one kernel launch whatever
        the ids' order (kernels/triton/kv_block_copy.py), every byte read and written once. On the
        CPU each run of blocks consecutive on both sides is one strided slice copy; ids in more
        than MAX_COPY_RUNS runs are gathered into a temporary and scattered (twice the traffic)."""
        assert len(src_ids) == len(dst_ids), (len(src_ids), len(dst_ids))
        l0, l1 = layers
        if self.tensor.is_cuda:
            from kernels.triton.kv_block_copy import copy_kv_blocks

            copy_kv_blocks(src, self.tensor, src_ids, dst_ids, layers)
            return
        runs = block_runs(src_ids, dst_ids)
        if len(runs) > MAX_COPY_RUNS:
            index = torch.tensor(src_ids, device=src.device)
            self.write_blocks(l0, l1, dst_ids, src[l0:l1].index_select(2, index))
            return
        for start, count in runs:
            s0, d0 = src_ids[start], dst_ids[start]
            self.tensor[l0:l1, :, d0 : d0 + count].copy_(src[l0:l1, :, s0 : s0 + count])

    def write_blocks(self, layer_start: int, layer_end: int, block_ids: list[int], src: torch.Tensor) -> None:
        """kv[layer_start:layer_end, :, block_ids] = src, src [layers, 2, blocks, block_size,
        num_kv_heads, head_dim] in the model's layout on any device (a KV chunk fetched from a
        prefill worker)."""
        kv = self.tensor
        src = src.to(kv.device)  # synchronous from pageable memory: the caller may drop it after
        first = block_ids[0]
        if block_ids == list(range(first, first + len(block_ids))):  # contiguous: a plain slice
            kv[layer_start:layer_end, :, first : first + len(block_ids)] = src
        else:
            kv[layer_start:layer_end, :, torch.tensor(block_ids, device=kv.device)] = src
        if src.is_cuda:
            # a chunk staged on a side stream (kv_transfer.stage_on_device): not reused before this write
            src.record_stream(torch.cuda.current_stream(kv.device))


# A peer copy of blocks in at most this many runs goes as slice copies (one launch each)
MAX_COPY_RUNS = 16


def block_runs(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
    """(start, count) of the runs where both block lists go up by one at a time (a copy between
    two caches of this layout moves each run as one region: KVCache.copy_blocks_from, kv_nixl)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(a) + 1):
        if i == len(a) or a[i] != a[i - 1] + 1 or b[i] != b[i - 1] + 1:
            runs.append((start, i - start))
            start = i
    return runs
