"""CUDA graphs for forwards of a few query rows per sequence: speculative verification (each drafted
sequence's last token and its K drafts, K + 1 rows) and the catch-up forwards of a draft model or
an EAGLE head (the tokens the last verification appended: at most K + 1 per sequence).

Graph (bs, q) computes up to bs sequences of at most q new tokens each: bs * q token rows with
max_seqlen_q = q. Nothing in it depends on a host value of the step: the prefill attention kernel's
grid is (cdiv(q * group, BLOCK_M), bs, kv heads), fixed at capture, and each program reads its
sequence's real query range and length on the device (cu_seqlens_q, seq_lens). Captured sizes: bs
over the decode ladder up to VERIFY_GRAPH_MAX_SEQS (speculation pays at small batches: the
adaptive rule turns it off at large ones), q = K + 1 for K in 1, 2, 4, 8, 16 up to
--num-speculative-tokens and that K itself; graphs of more than --max-num-batched-tokens rows are
not captured (no step has more tokens). A step replays the captured size with the fewest rows that
holds it, so a step of adaptive K = 3 under K = 4 replays q = 5 (one padding row per sequence), and
a sequence with a shorter draft (cut by max_tokens, a stop token or the grammar) or none simply
has fewer rows.

Packing (`pack_step`): the step's T real tokens lie back to back in rows [0, T) as in an eager
forward; rows [T, bs * q) are padding (id 0, position 0, slot -1: no KV write) and sequences
[B, bs) are padding (seq_len 0, an empty query range at T), which the attention leaves unwritten.
Every other op is row-independent, so padding rows are computed and discarded. As in the decode
graphs, all inputs travel in one int32 host->device copy through a pinned staging buffer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from services.worker.cuda_graph import NO_VARIANTS, DecodeOutputs, GraphVariants, batch_size_ladder
from services.worker.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

# Largest batch verification graphs are captured for (larger drafted steps run eagerly).
VERIFY_GRAPH_MAX_SEQS = 32
# Draft lengths captured below the configured K (a step's K pads up to the next one).
K_LADDER = (1, 2, 4, 8, 16)


def query_rows_ladder(max_k: int) -> list[int]:
    """Query rows per sequence captured for draft lengths up to max_k: K + 1 for K in K_LADDER
    below max_k, and max_k + 1."""
    return sorted({k + 1 for k in K_LADDER if k < max_k} | {max_k + 1})


def verify_graph_sizes(max_num_seqs: int, max_k: int, max_num_tokens: int) -> list[tuple[int, int]]:
    """The (bs, q) graphs to capture: bs over the decode ladder up to VERIFY_GRAPH_MAX_SEQS, q over
    `query_rows_ladder(max_k)`, at most `max_num_tokens` rows each (0: no token limit)."""
    if max_k <= 0 or max_num_seqs <= 0:
        return []
    batches = batch_size_ladder(min(max_num_seqs, VERIFY_GRAPH_MAX_SEQS))
    return [
        (bs, q)
        for bs in batches
        for q in query_rows_ladder(max_k)
        if max_num_tokens <= 0 or bs * q <= max_num_tokens
    ]


def pick_graph(sizes: list[tuple[int, int]], num_seqs: int, max_seqlen_q: int) -> tuple[int, int] | None:
    """The captured (bs, q) with the fewest rows that holds `num_seqs` sequences of at most
    `max_seqlen_q` new tokens each (ties: the smaller q); None when none does."""
    fits = [(bs * q, q, bs) for bs, q in sizes if bs >= num_seqs and q >= max_seqlen_q]
    if num_seqs <= 0 or not fits:
        return None
    _, q, bs = min(fits)
    return bs, q


@dataclass(frozen=True)
class PackLayout:
    """Offsets of the int32 pack: [ids | positions | slots] (max_tokens each), seq_lens
    (max_seqs), cu_seqlens_q (max_seqs + 1), then the block tables of the step's sequences,
    flattened (its width)."""

    max_tokens: int
    max_seqs: int
    max_blocks: int

    @property
    def seq_lens(self) -> int:
        return 3 * self.max_tokens

    @property
    def cu_seqlens(self) -> int:
        return self.seq_lens + self.max_seqs

    @property
    def tables(self) -> int:
        return self.cu_seqlens + self.max_seqs + 1

    @property
    def length(self) -> int:
        return self.tables + self.max_seqs * self.max_blocks


def pack_step(
    stage: torch.Tensor,  # [layout.length] int32 (host)
    layout: PackLayout,
    bs: int,
    q: int,
    input_ids: list[int],  # [T]
    positions: list[int],  # [T]
    slots: list[int],  # [T]
    cu_seqlens: list[int],  # [B + 1]
    seq_lens: list[int],  # [B]
    block_tables: torch.Tensor,  # [B, w] int32
) -> int:
    """Write a step into `stage` as graph (bs, q) reads it (module docstring: real rows first, then
    padding); returns how many leading entries of `stage` hold it."""
    num_seqs, num_tokens, rows = len(seq_lens), cu_seqlens[-1], bs * q
    width = block_tables.shape[1]
    if not (
        0 < num_seqs <= bs <= layout.max_seqs
        and rows <= layout.max_tokens
        and width <= layout.max_blocks
        and len(input_ids) == len(positions) == len(slots) == num_tokens
        and len(cu_seqlens) == num_seqs + 1
        and max(b - a for a, b in pairwise(cu_seqlens)) <= q
    ):
        raise ValueError(f"a step of {num_seqs} sequences, {num_tokens} tokens does not fit graph {(bs, q)}")
    for base, values, pad in (
        (0, input_ids, 0),
        (layout.max_tokens, positions, 0),
        (2 * layout.max_tokens, slots, -1),
    ):
        stage[base : base + num_tokens] = torch.tensor(values, dtype=torch.int32)
        stage[base + num_tokens : base + rows] = pad  # padding rows: slot -1 writes no KV
    base = layout.seq_lens
    stage[base : base + num_seqs] = torch.tensor(seq_lens, dtype=torch.int32)
    stage[base + num_seqs : base + bs] = 0
    base = layout.cu_seqlens
    stage[base : base + num_seqs + 1] = torch.tensor(cu_seqlens, dtype=torch.int32)
    stage[base + num_seqs + 1 : base + bs + 1] = num_tokens  # padding sequences: empty query ranges
    end = layout.tables + num_seqs * width
    stage[layout.tables : end] = block_tables.reshape(-1)
    return end


class VerifyGraphRunner:
    """Graphs of `forward(input_ids [bs * q], meta) -> DecodeOutputs` for every (bs, q) of `sizes`.

    Without `capture()` (a CPU runner: tests) `run` computes the same padded inputs with an eager
    forward, so everything but the capture itself is checked on the CPU."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, AttentionMetadata], DecodeOutputs],
        cos_sin_cache: torch.Tensor,  # [max_pos, D]
        sizes: list[tuple[int, int]],
        max_blocks_per_seq: int,
        device: torch.device,
        name: str = "verification",
        variants: GraphVariants = NO_VARIANTS,  # (LoRA: with and without its kernels, cuda_graph.py)
    ) -> None:
        assert sizes, "no graph sizes"
        self.forward, self.device, self.name = forward, device, name
        self.variants = variants
        self.sizes = sorted(sizes)
        self.layout = layout = PackLayout(
            max(bs * q for bs, q in sizes), max(bs for bs, _ in sizes), max_blocks_per_seq
        )
        self.pack = torch.zeros(layout.length, dtype=torch.int32, device=device)
        # two pinned staging buffers used in turn, each guarded by the event after its copy
        cuda = device.type == "cuda"
        self.stages = [torch.zeros(layout.length, dtype=torch.int32, pin_memory=cuda) for _ in range(2)]
        self.stage_events = [torch.cuda.Event() for _ in range(2)] if cuda else []
        self._stage_turn = 0
        self.block_tables = torch.zeros(layout.max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cos_sin_cache = cos_sin_cache
        self.graphs: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}  # by (variant, bs, q)
        self.outputs: dict[tuple[str, int, int], DecodeOutputs] = {}
        self.num_replays = 0  # steps that ran a graph of this runner (tests, Info)
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    def _inputs(self, bs: int, q: int) -> tuple[torch.Tensor, AttentionMetadata]:
        lay, rows = self.layout, bs * q
        meta = AttentionMetadata(
            positions=self.pack[lay.max_tokens : lay.max_tokens + rows],
            slot_mapping=self.pack[2 * lay.max_tokens : 2 * lay.max_tokens + rows],
            block_tables=self.block_tables[:bs],
            cu_seqlens_q=self.pack[lay.cu_seqlens : lay.cu_seqlens + bs + 1],
            seq_lens=self.pack[lay.seq_lens : lay.seq_lens + bs],
            max_seqlen_q=q,
            cos_sin_cache=self.cos_sin_cache,
            num_decode_rows=0,  # every sequence through the prefill kernel: one grid whatever the step
        )
        return self.pack[:rows], meta

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, the most rows first so the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self.pack.zero_()  # capture-time inputs are all padding: empty query ranges...
        lay = self.layout
        self.pack[2 * lay.max_tokens : 3 * lay.max_tokens].fill_(-1)  # ...and no KV writes
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for variant in self.variants.names:
            with self.variants.enter(variant):
                for bs, q in sorted(self.sizes, key=lambda s: (s[0] * s[1], s[1]), reverse=True):
                    ids, meta = self._inputs(bs, q)
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(stream):  # warm-up: compiles kernels, creates cuBLAS workspaces
                        self.forward(ids, meta)
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.outputs[variant, bs, q] = self.forward(ids, meta)
                    self.graphs[variant, bs, q] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - free_after)
        log.info(
            "captured %d CUDA graphs for %s (batch sizes %s x query rows %s) in %.1f s using %.0f MiB",
            len(self.graphs),
            self.name,
            sorted({bs for bs, _ in self.sizes}),
            sorted({q for _, q in self.sizes}),
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    def can_run(self, num_seqs: int, max_seqlen_q: int, max_blocks: int) -> bool:
        return (
            max_blocks <= self.layout.max_blocks
            and pick_graph(self.sizes, num_seqs, max_seqlen_q) is not None
        )

    def run(
        self,
        input_ids: list[int],  # [T] host ids
        positions: list[int],  # [T]
        slot_mapping: list[int],  # [T]
        cu_seqlens: list[int],  # [B + 1]
        seq_lens: list[int],  # [B]
        block_tables: torch.Tensor,  # [B, w] int32 on the CPU
    ) -> DecodeOutputs:  # rows [:T] of the graph's outputs (views: use them before the next replay)
        num_seqs, num_tokens = len(seq_lens), cu_seqlens[-1]
        max_q = max(b - a for a, b in pairwise(cu_seqlens))
        size = pick_graph(self.sizes, num_seqs, max_q)
        assert size is not None, (num_seqs, max_q)
        turn, self._stage_turn = self._stage_turn, self._stage_turn ^ 1
        stage = self.stages[turn]
        if self.stage_events:  # its last copy (two steps ago) is done: returns at once in practice
            self.stage_events[turn].synchronize()
        end = pack_step(
            stage, self.layout, *size, input_ids, positions, slot_mapping, cu_seqlens, seq_lens, block_tables
        )
        self.pack[:end].copy_(stage[:end], non_blocking=True)
        if self.stage_events:
            self.stage_events[turn].record()
        width = block_tables.shape[1]
        tables = self.pack[self.layout.tables : end].view(num_seqs, width)
        self.block_tables[:num_seqs, :width].copy_(tables)
        self.num_replays += 1
        key = (self.variants.current(), *size)
        graph = self.graphs.get(key)
        if graph is None:  # not captured (a CPU runner, tests): the same padded forward, eagerly
            return self.forward(*self._inputs(*size)).head(num_tokens)
        graph.replay()
        return self.outputs[key].head(num_tokens)
