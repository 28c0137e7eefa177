"""CUDA graphs for decode steps: captured once at start-up for a ladder of batch sizes, replayed padded.

A decode step (every scheduled sequence computes exactly one token) of B sequences replays the
graph of the smallest captured size >= B. The graphs read their inputs from static device
buffers; each step packs the host inputs into a pinned staging buffer and copies them in with
one asynchronous copy, so a step launches one graph instead of hundreds of kernels and
never waits on the device (the only synchronisation is the caller reading sampled tokens).

Padding rows: input id 0, position 0, slot -1 (the KV write skips it), seq_len 0 and an empty
query range in cu_seqlens_q (the attention kernel leaves their rows unwritten). Their hidden
rows are discarded; every op of the model is row-independent, so they cannot leak.

Variants (`GraphVariants`): a model whose steps run different kernels by a host-side choice
captures one graph per variant and size, and each step replays the variant its model is set up
for. LoRA: steps with rows of an adapter replay graphs with the LoRA kernels, steps of base rows
only graphs without them (services/worker/layers/lora.py).

The graphs output hidden states and, for small batch sizes (the caller's forward decides, see
ModelRunner._decode_forward), the logits and their argmax too: a batch-1 greedy step then
replays one graph and reads back one token id. Logits for every ladder size would cost gigabytes
of graph memory (each graph's outputs stay alive), so large batches run the LM head outside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from services.worker.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOutputs:
    """What a decode graph produces (views of its static outputs: use them before the next step)."""

    hidden: torch.Tensor  # [B, H]
    logits: torch.Tensor | None  # [B, vocab] in the model dtype, small batch sizes only
    greedy: torch.Tensor | None  # [B] int64 argmax of logits
    # [B, n * H] the residual streams an EAGLE-3 head reads (LlamaModel.aux_layers); None without
    aux: torch.Tensor | None = None

    def head(self, rows: int) -> DecodeOutputs:
        return DecodeOutputs(
            self.hidden[:rows],
            None if self.logits is None else self.logits[:rows],
            None if self.greedy is None else self.greedy[:rows],
            None if self.aux is None else self.aux[:rows],
        )


@dataclass(frozen=True)
class GraphVariants:
    """Graphs of several variants for every batch size (module docstring)."""

    names: tuple[str, ...]
    # the model set up to issue variant `name`'s kernels, for as long as the context lasts (capture)
    enter: Callable[[str], contextlib.AbstractContextManager[None]]
    # the variant the next step replays (read by `run`, after the step's inputs are set)
    current: Callable[[], str]


NO_VARIANTS = GraphVariants(("",), lambda name: contextlib.nullcontext(), lambda: "")


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, then max_num_seqs itself (vLLM's ladder)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted({*sizes, max_num_seqs})


class CudaGraphRunner:
    """Decode-step graphs of `forward(input_ids [B], meta) -> DecodeOutputs` for B in the ladder."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, AttentionMetadata], DecodeOutputs],
        cos_sin_cache: torch.Tensor,  # [max_pos, D]
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        name: str = "decode batch sizes",
        variants: GraphVariants = NO_VARIANTS,
    ) -> None:
        self.forward = forward
        self.name = name  # (the log line's)
        self.variants = variants
        self.device = device
        self.batch_sizes = batch_size_ladder(max_num_seqs)
        self.max_bs = max_bs = self.batch_sizes[-1]
        self.max_blocks = max_blocks_per_seq
        # Static device inputs; the graphs read exactly these addresses. Everything a step needs
        # travels in ONE int32 host->device copy: [input_ids | positions | slots | seq_lens |
        # cu_seqlens_q | block tables of the batch, flattened]; the kernels and the embedding take
        # int32 indices. The flattened tables are then scattered into the [max_bs, max_blocks]
        # table the graphs read (one device copy).
        self.block_offset = 5 * max_bs + 1  # after cu_seqlens_q, which holds max_bs + 1 entries
        pack_len = self.block_offset + max_bs * max_blocks_per_seq
        self.pack = torch.zeros(pack_len, dtype=torch.int32, device=device)
        # Two pinned staging buffers used in turn: with async scheduling the next step is packed
        # while the copy out of the previous staging buffer may still wait behind the running
        # step. The event recorded after each copy guards the buffer's reuse.
        self.stages = [torch.zeros(pack_len, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        # The same buffers as numpy arrays: a step fills them with numpy slice assignments, each a
        # memcpy or a C loop, where a torch slice assignment is an op through the dispatcher.
        self.stage_arrays = [stage.numpy() for stage in self.stages]
        self._row_numbers = np.arange(max_bs + 1, dtype=np.int32)  # cu_seqlens_q of one token a row
        self.stage_events = [torch.cuda.Event() for _ in range(2)]
        self._stage_turn = 0
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.input_ids = self.pack[:max_bs]
        self.meta_template = AttentionMetadata(
            positions=self.pack[max_bs : 2 * max_bs],
            slot_mapping=self.pack[2 * max_bs : 3 * max_bs],
            block_tables=self.block_tables,
            cu_seqlens_q=self.pack[4 * max_bs : 4 * max_bs + 1 + max_bs],
            seq_lens=self.pack[3 * max_bs : 4 * max_bs],
            max_seqlen_q=1,
            cos_sin_cache=cos_sin_cache,
        )
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}  # by (variant, batch size)
        self.outputs: dict[tuple[str, int], DecodeOutputs] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.num_replays = 0  # steps that replayed a graph (tests; a group's ranks replay alike)
        self.replays_by_variant = dict.fromkeys(variants.names, 0)

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
        self.pack.zero_()
        self.meta_template.slot_mapping.fill_(-1)  # capture-time inputs are all padding: no KV writes
        pool = torch.cuda.graph_pool_handle()  # (one for all variants: one graph replays at a time)
        stream = torch.cuda.Stream(self.device)
        for variant in self.variants.names:
            with self.variants.enter(variant):
                for bs in reversed(self.batch_sizes):
                    meta = self._meta(bs)
                    ids = self.input_ids[:bs]
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(stream):  # warm-up: compiles kernels, creates cuBLAS workspaces
                        self.forward(ids, meta)
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.outputs[variant, bs] = self.forward(ids, meta)
                    self.graphs[variant, bs] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - free_after)
        log.info(
            "captured %d CUDA graphs for %s %s%s in %.1f s using %.0f MiB",
            len(self.graphs),
            self.name,
            _ladder_text(self.batch_sizes),
            f" (variants {', '.join(self.variants.names)})" if len(self.variants.names) > 1 else "",
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    def can_run(self, num_seqs: int, max_seqlen_q: int, max_blocks: int) -> bool:
        return max_seqlen_q == 1 and 0 < num_seqs <= self.max_bs and max_blocks <= self.max_blocks

    def padded_size(self, num_seqs: int) -> int:
        return next(b for b in self.batch_sizes if b >= num_seqs)

    def run(
        self,
        input_ids: list[int] | torch.Tensor,  # [B] host ids, or [B] int64 already on the device
        positions: list[int],  # [B]
        slot_mapping: list[int],  # [B]
        seq_lens: list[int],  # [B]
        # [B, w] int32 on the CPU, w <= max_blocks_per_seq; or on the device (beam search launched
        # ahead gathers its beams' tables there: beam_step.BeamStep.ahead)
        block_tables: torch.Tensor,
    ) -> DecodeOutputs:  # rows [:B] of the graph's outputs (views: use them before the next step)
        num_seqs = len(positions)
        bs = self.padded_size(num_seqs)
        width = block_tables.shape[1]
        turn, self._stage_turn = self._stage_turn, self._stage_turn ^ 1
        stage, stage_event = self.stages[turn], self.stage_events[turn]
        packed = self.stage_arrays[turn]  # (the same memory as `stage`)
        stage_event.synchronize()  # its last copy (two steps ago) is done: returns at once in practice
        max_bs = self.max_bs
        if isinstance(input_ids, torch.Tensor):  # async scheduling: the ids are on the device
            device_ids, host_ids = input_ids, None
        else:
            device_ids, host_ids = None, input_ids
        for field_index, values, pad in (
            (0, host_ids, 0),
            (1, positions, 0),
            (2, slot_mapping, -1),  # padding rows write no KV
            (3, seq_lens, 0),
        ):
            base = field_index * max_bs
            packed[base : base + num_seqs] = 0 if values is None else values
            packed[base + num_seqs : base + bs] = pad
        cu = 4 * max_bs
        packed[cu : cu + num_seqs + 1] = self._row_numbers[: num_seqs + 1]
        packed[cu + num_seqs + 1 : cu + bs + 1] = num_seqs  # padding entries: empty query ranges
        on_host = block_tables.device.type == "cpu"
        end = self.block_offset + num_seqs * width if on_host else self.block_offset
        if on_host:
            packed[self.block_offset : end] = block_tables.numpy().reshape(-1)
        self.pack[:end].copy_(stage[:end], non_blocking=True)
        stage_event.record()
        if device_ids is not None:  # async scheduling: the previous step's sampled tokens, device to device
            self.input_ids[:num_seqs].copy_(device_ids)
        if on_host:
            self.block_tables[:num_seqs, :width].copy_(
                self.pack[self.block_offset : end].view(num_seqs, width)
            )
        else:
            self.block_tables[:num_seqs, :width].copy_(block_tables)
        variant = self.variants.current()
        self.graphs[variant, bs].replay()
        self.num_replays += 1
        self.replays_by_variant[variant] += 1
        return self.outputs[variant, bs].head(num_seqs)


def _ladder_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}..{sizes[-1]} ({len(sizes)} sizes)"
