"""Piecewise CUDA graphs for steps that carry prompt tokens: everything but attention replayed.

A prefill (or mixed) step runs the model eagerly: a few hundred kernel launches, each behind
Python and torch's dispatch. For a small model the host's share of such a step is most of it (a
short prompt's prefill spends far longer launching than computing: benchmarks/prefill_profile.py),
and in the worker that host time also competes with the event loop for the GIL.

The graphs: at start-up, for each token count T of a ladder (`token_ladder`), the model's forward
over T padded tokens is captured as pieces cut at every attention call, vLLM's piecewise graphs:
piece 0 (the embedding, layer 0 up to its q/k/v, rotary and KV write), attention 0, piece 1
(layer 0's o_proj and MLP, layer 1 up to its KV write), ..., the last piece (the final norm). The
attention between the pieces runs eagerly with the step's real metadata (its variable-length
prompts, cached prefixes and decode rows are host-side choices of grid and kernel a graph could
not hold); every other op is row-independent, so the graphs run T_bucket rows of which the step
uses the first T. A step of T tokens replays the smallest bucket >= T: one copy of its ids,
positions and slots (padding rows: slot -1, no KV written), the pieces and the attention calls.

How a piece is cut: while capturing (`attention.cutting_pieces`), `PagedAttention._attend` hands
its query to `PieceCapture.cut`, which has the piece leave the query in a static query buffer (the
rotary kernel writes it there directly: `rotate_write_attend`), ends the running capture, records
the cut (the layer, the query and output buffers), and begins the next piece in the same pool. The queries and the attention
outputs live outside the pool, one buffer each per attention shape, shared by every layer and
bucket: layer i's are used by attention i and piece i + 1 before layer i + 1's are written (one
stream). So no pool memory outlives its piece, and the pool is one piece's peak, not the sum of
every layer's queries over every bucket. Layer-wise KV push (kv_layerwise.py) is told each
layer's KV is written after the piece that wrote it.

Not used for: steps with image rows, speculative (drafted) steps, adapters (LoRA), parallel
groups, models with EAGLE hidden-state taps, and steps of at most `MIN_TOKENS` tokens (the
decode-sized kernel choices of such a step differ from the bucket's). `--prefill-graph-max-tokens
0` or `--enforce-eager` turns it off; a model whose forward cannot be captured logs why and runs
eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from services.worker.layers.attention import AttentionMetadata, PagedAttention, cutting_pieces

log = logging.getLogger(__name__)

# Steps of at most this many tokens run eagerly: kernels choose decode-sized paths up to 16 rows
# (skinny GEMMs, quantized GEMVs, routers), which a bucket of more rows would not take.
MIN_TOKENS = 16


def token_ladder(max_tokens: int) -> list[int]:
    """Bucket sizes: steps of 32 up to 256, then of a quarter of the power of two below, up to
    max_tokens (included): a step of T tokens pads fewer than max(T / 4, 32) rows, and a step
    budget's full steps (max_tokens) pad none."""
    sizes: set[int] = set()
    size = 32
    while size < max_tokens:
        sizes.add(size)
        step = max(32, 1 << (size.bit_length() - 1) >> 2)  # (a quarter of the power of two <= size)
        size += step
    if max_tokens > MIN_TOKENS:
        sizes.add(max_tokens)
    return sorted(s for s in sizes if s <= max_tokens)


@dataclass(frozen=True)
class Cut:
    """One attention call between two pieces: the layer, the query its piece leaves (a view of
    graph-pool memory, [T_bucket, Hq, D]) and the buffer the next piece reads ([T_bucket, Hq, D])."""

    layer: PagedAttention
    query: torch.Tensor
    out: torch.Tensor


@dataclass
class PiecewiseGraph:
    """A forward over `tokens` padded tokens: its pieces, the cuts between them, its output."""

    tokens: int
    pieces: list[torch.cuda.CUDAGraph]
    cuts: list[Cut]
    hidden: torch.Tensor  # [tokens, hidden]: rows of the output buffer all buckets share


class PieceCapture:
    """One bucket's capture in progress: `cut` ends a piece at an attention call and begins the next."""

    def __init__(self, pool: Any, buffer: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self.pool = pool
        # ("query" or "out", a query) -> the static buffer of that role and the query's shape, sliced
        self.buffer = buffer
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[Cut] = []
        self.current: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.current = graph

    def end(self) -> None:
        assert self.current is not None
        graph, self.current = self.current, None
        graph.capture_end()
        self.pieces.append(graph)

    def query_buffer(self, query: torch.Tensor) -> torch.Tensor:
        """Where a piece may write its attention's query directly (`rotate_write_attend`)."""
        return self.buffer("query", query)

    def cut(self, layer: PagedAttention, query: torch.Tensor) -> torch.Tensor:
        """At an attention call while capturing: the query goes to the static query buffer (a copy
        in the piece, unless the piece wrote it there), the piece ends; the attention runs at
        replay (`PrefillGraphs.run`); its output buffer is what the next piece reads. (Nothing of
        the pool is held past its piece: the pool's memory serves every piece and bucket in turn.)"""
        static = self.buffer("query", query)
        if query.data_ptr() != static.data_ptr():
            static.copy_(query)
        self.end()
        out = self.buffer("out", query)
        self.cuts.append(Cut(layer, static, out))
        self.begin()
        return out


class PrefillGraphs:
    """Piecewise graphs of `forward(input_ids [T], meta) -> hidden [T, H]` for T in the ladder."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, AttentionMetadata], torch.Tensor],
        paged_attention: Callable[..., torch.Tensor],
        cos_sin_cache: torch.Tensor,  # [max_pos, D]
        max_tokens: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.paged_attention = paged_attention
        self.device = device
        self.sizes = token_ladder(max_tokens)
        self.max_tokens = max_tokens = self.sizes[-1] if self.sizes else 0
        # Static inputs, int64 as the eager forward's: [ids | positions | slots], each max_tokens
        # long; a bucket's graph reads the first T_bucket of each. One host -> device copy a step
        # from one of two pinned staging buffers (async scheduling packs the next step while the
        # previous copy may still wait behind the running step; an event guards each reuse).
        self.pack = torch.zeros(3 * max_tokens, dtype=torch.int64, device=device)
        self.stages = [torch.zeros(3 * max_tokens, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.stage_arrays = [stage.numpy() for stage in self.stages]
        self.stage_events = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0
        self.input_ids = self.pack[:max_tokens]
        self.positions = self.pack[max_tokens : 2 * max_tokens]
        self.slots = self.pack[2 * max_tokens :]
        self.cos_sin_cache = cos_sin_cache
        self.hidden = torch.empty(
            max_tokens, hidden_size, dtype=dtype, device=device
        )  # every bucket's output
        # attention queries and outputs by role and shape (`_buffer`)
        self.buffers: dict[tuple[str, int, int, torch.dtype], torch.Tensor] = {}
        self.graphs: dict[int, PiecewiseGraph] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.num_replays = 0  # steps that replayed (tests)

    def _buffer(self, role: str, query: torch.Tensor) -> torch.Tensor:
        """The static buffer of `role` ("query", "out") for queries of this shape, its first rows:
        outside the graph pool, shared by every layer and bucket (module docstring)."""
        key = (role, query.shape[1], query.shape[2], query.dtype)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = torch.empty(
                self.max_tokens, query.shape[1], query.shape[2], dtype=query.dtype, device=self.device
            )
            self.buffers[key] = buffer
        return buffer[: query.shape[0]]

    def _meta(self, tokens: int) -> AttentionMetadata:
        """Capture-time metadata: one sequence of `tokens` new tokens at positions 0.., no KV
        written (slots -1), its block table all block 0 (the warm-up's attention reads it)."""
        return AttentionMetadata(
            positions=self.positions[:tokens],
            slot_mapping=self.slots[:tokens],
            block_tables=torch.zeros(1, tokens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            max_seqlen_q=tokens,
            cos_sin_cache=self.cos_sin_cache,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool. Raises
        what the capture raised (a forward that synchronises with the host cannot be captured)."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self.pack.zero_()
        self.slots.fill_(-1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for tokens in reversed(self.sizes):
            meta = self._meta(tokens)
            ids = self.input_ids[:tokens]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compiles kernels, creates cuBLAS workspaces
                self.forward(ids, meta)
                stream.synchronize()
                capture = PieceCapture(pool, self._buffer)
                try:
                    with cutting_pieces(capture):
                        capture.begin()
                        hidden = self.hidden[:tokens]  # (the last piece leaves the output outside the pool)
                        hidden.copy_(self.forward(ids, meta))
                        capture.end()
                except BaseException:
                    if capture.current is not None:  # (end the broken capture before giving up)
                        with contextlib.suppress(RuntimeError):
                            capture.current.capture_end()
                    raise
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graphs[tokens] = PiecewiseGraph(tokens, capture.pieces, capture.cuts, hidden)
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - free_after)
        pieces = sum(len(g.pieces) for g in self.graphs.values())
        log.info(
            "captured piecewise CUDA graphs for prompt-carrying steps of %s tokens (%d pieces) in %.1f s using %.0f MiB",
            ", ".join(map(str, self.sizes)),
            pieces,
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    def can_run(self, num_tokens: int) -> bool:
        return MIN_TOKENS < num_tokens <= self.max_tokens and bool(self.graphs)

    def bucket(self, num_tokens: int) -> int:
        return next(t for t in self.sizes if t >= num_tokens)

    def run(
        self,
        input_ids: list[int] | torch.Tensor,  # [T] host ids, or [T] int64 on the device
        positions: list[int],  # [T]
        slots: list[int],  # [T]
        meta: AttentionMetadata,  # the step's attention metadata on the device (positions, slots unused)
    ) -> torch.Tensor:  # [T, hidden]: rows of the graph's output (a view: use it before the next step)
        num_tokens = len(positions)
        tokens = self.bucket(num_tokens)
        graph = self.graphs[tokens]
        turn, self._turn = self._turn, self._turn ^ 1
        stage, packed = self.stages[turn], self.stage_arrays[turn]
        self.stage_events[turn].synchronize()  # its copy two steps ago is done (at once in practice)
        m = self.max_tokens
        if isinstance(input_ids, torch.Tensor):
            packed[:num_tokens] = 0  # (overwritten on the device below)
        else:
            packed[:num_tokens] = input_ids
        packed[num_tokens:tokens] = 0
        packed[m : m + num_tokens] = positions
        packed[m + num_tokens : m + tokens] = 0
        packed[2 * m : 2 * m + num_tokens] = slots
        packed[2 * m + num_tokens : 2 * m + tokens] = -1  # padding rows write no KV
        # (one copy of the three fields' used rows: the pack's whole span up to the slots' end)
        end = 2 * m + tokens
        self.pack[:end].copy_(stage[:end], non_blocking=True)
        self.stage_events[turn].record()
        if isinstance(input_ids, torch.Tensor):  # async scheduling: the previous step's tokens
            self.input_ids[:num_tokens].copy_(input_ids)
        step_meta = replace(meta, positions=self.positions[:num_tokens], slot_mapping=self.slots[:num_tokens])
        for piece, cut in zip(graph.pieces, graph.cuts, strict=False):
            piece.replay()
            layer = cut.layer
            if layer.layer_signal is not None:  # (layer-wise push: its KV was written in that piece)
                layer.layer_signal.written(layer.layer_index)
            assert layer.kv_cache is not None
            self.paged_attention(
                cut.query[:num_tokens],
                layer.kv_cache,
                step_meta.block_tables,
                step_meta.cu_seqlens_q,
                step_meta.seq_lens,
                layer.scale,
                step_meta.max_seqlen_q,
                num_decode_rows=step_meta.num_decode_rows,
                out=cut.out[:num_tokens],
                **layer.attention_options(),
            )
        graph.pieces[-1].replay()
        self.num_replays += 1
        return graph.hidden[:num_tokens]
