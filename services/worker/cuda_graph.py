"""CUDA graphs for decode steps: captured once at start-up for a ladder of batch sizes, replayed padded.

A decode step (every scheduled sequence computes exactly one token) of B sequences replays the
graph of the smallest captured size >= B. The graphs read their inputs from static device
buffers; each step packs the host inputs into pinned staging buffers and copies them in with
three asynchronous copies, so a step launches one graph instead of hundreds of kernels and
never waits on the device (the only synchronisation is the caller reading sampled tokens).

Padding rows: input id 0, position 0, slot -1 (the KV write skips it), seq_len 0 and an empty
query range in cu_seqlens_q (the attention kernel writes 0 for them). Their hidden rows are
discarded. The graphs output hidden states, not logits: the [B, vocab] logits of every ladder
size would cost gigabytes of graph memory, and the LM head is one GEMM outside the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from services.worker.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, then max_num_seqs itself (vLLM's ladder)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted({*sizes, max_num_seqs})


class CudaGraphRunner:
    """Decode-step graphs of `forward(input_ids [B], meta) -> hidden [B, H]` for B in the ladder."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, AttentionMetadata], torch.Tensor],
        cos_sin_cache: torch.Tensor,  # [max_pos, D]
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.device = device
        self.batch_sizes = batch_size_ladder(max_num_seqs)
        self.max_bs = max_bs = self.batch_sizes[-1]
        self.max_blocks = max_blocks_per_seq
        # Static device inputs; the graphs read exactly these addresses.
        self.ids_pack = torch.zeros(
            3, max_bs, dtype=torch.int64, device=device
        )  # input_ids, positions, slots
        self.lens_pack = torch.zeros(
            2 * max_bs + 1, dtype=torch.int32, device=device
        )  # seq_lens | cu_seqlens_q
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.block_scratch = torch.zeros(max_bs * max_blocks_per_seq, dtype=torch.int32, device=device)
        # Pinned host staging, reused every step (the previous step's copies finished when its
        # sampled tokens were read).
        self.ids_stage = torch.zeros(3, max_bs, dtype=torch.int64, pin_memory=True)
        self.lens_stage = torch.zeros(2 * max_bs + 1, dtype=torch.int32, pin_memory=True)
        self.block_stage = torch.zeros(max_bs * max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
        self.meta_template = AttentionMetadata(
            positions=self.ids_pack[1],
            slot_mapping=self.ids_pack[2],
            block_tables=self.block_tables,
            cu_seqlens_q=self.lens_pack[max_bs:],
            seq_lens=self.lens_pack[:max_bs],
            max_seqlen_q=1,
            cos_sin_cache=cos_sin_cache,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    def _meta(self, bs: int) -> AttentionMetadata:
        t = self.meta_template
        return replace(
            t,
            positions=t.positions[:bs],
            slot_mapping=t.slot_mapping[:bs],
            block_tables=t.block_tables[:bs],
            cu_seqlens_q=t.cu_seqlens_q[: bs + 1],
            seq_lens=t.seq_lens[:bs],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first so the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self.ids_pack[2].fill_(-1)  # capture-time inputs are all padding: nothing touches the KV cache
        self.lens_pack.zero_()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for bs in reversed(self.batch_sizes):
            meta = self._meta(bs)
            ids = self.ids_pack[0, :bs]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compiles kernels, creates cuBLAS workspaces
                self.forward(ids, meta)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self.forward(ids, meta)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - free_after)
        log.info(
            "captured %d CUDA graphs for decode batch sizes %s in %.1f s using %.0f MiB",
            len(self.graphs),
            _ladder_text(self.batch_sizes),
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    def can_run(self, num_seqs: int, max_seqlen_q: int, max_blocks: int) -> bool:
        return max_seqlen_q == 1 and 0 < num_seqs <= self.max_bs and max_blocks <= self.max_blocks

    def padded_size(self, num_seqs: int) -> int:
        return next(b for b in self.batch_sizes if b >= num_seqs)

    def run(
        self,
        input_ids: list[int],  # [B]
        positions: list[int],  # [B]
        slot_mapping: list[int],  # [B]
        seq_lens: list[int],  # [B]
        block_tables: torch.Tensor,  # [B, w] int32 on the CPU, w <= max_blocks_per_seq
    ) -> torch.Tensor:  # [B, H] hidden states (a view of the graph's output: use before the next step)
        num_seqs = len(input_ids)
        bs = self.padded_size(num_seqs)
        width = block_tables.shape[1]
        ids = self.ids_stage
        ids[0, :num_seqs] = torch.tensor(input_ids, dtype=torch.int64)
        ids[1, :num_seqs] = torch.tensor(positions, dtype=torch.int64)
        ids[2, :num_seqs] = torch.tensor(slot_mapping, dtype=torch.int64)
        ids[:, num_seqs:bs] = 0
        ids[2, num_seqs:bs] = -1
        lens = self.lens_stage
        max_bs = self.max_bs
        lens[:num_seqs] = torch.tensor(seq_lens, dtype=torch.int32)
        lens[num_seqs:bs] = 0
        cu = lens[max_bs : max_bs + bs + 1]
        cu[: num_seqs + 1] = torch.arange(num_seqs + 1, dtype=torch.int32)
        cu[num_seqs + 1 :] = num_seqs
        self.block_stage[: num_seqs * width] = block_tables.reshape(-1)
        # Whole buffers (a few KiB): contiguous pinned copies stay asynchronous.
        self.ids_pack.copy_(ids, non_blocking=True)
        self.lens_pack.copy_(lens, non_blocking=True)
        scratch = self.block_scratch[: num_seqs * width]
        scratch.copy_(self.block_stage[: num_seqs * width], non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(scratch.view(num_seqs, width))
        self.graphs[bs].replay()
        return self.outputs[bs][:num_seqs]


def _ladder_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}..{sizes[-1]} ({len(sizes)} sizes)"
