"""Paged attention over the worker's KV cache, and the per-step metadata every layer reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from kernels import KernelOps

if TYPE_CHECKING:
    from services.worker.kv_layerwise import LayerSignal


@dataclass(frozen=True)
class AttentionMetadata:
    """Flat description of one step's batch (prefill chunks and decodes mixed)."""

    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where its K/V go
    block_tables: torch.Tensor  # [B, max_blocks] int32: each sequence's blocks, padded with 0
    cu_seqlens_q: torch.Tensor  # [B+1] int32: token offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [B] int32: cached + new tokens of each sequence
    max_seqlen_q: int
    cos_sin_cache: torch.Tensor  # [max_pos, head_dim]: cos in [:, :D/2], sin in [:, D/2:]
    # Sequences [0, k) have one new token each (token i is sequence i): in a step that also carries
    # prompt chunks, the GPU attends them with the decode kernel (paged_attention.py).
    num_decode_rows: int = 0


class PieceCut(Protocol):
    """While a prefill step's piecewise graphs are captured (services/worker/prefill_graph.py):
    where each attention call goes instead of its kernels."""

    def query_buffer(self, query: torch.Tensor) -> torch.Tensor:
        """The static buffer the piece may write the attention's query into."""
        ...

    def cut(self, layer: PagedAttention, query: torch.Tensor) -> torch.Tensor:
        """End the piece at this attention; its output buffer, which the next piece reads."""
        ...


_piece_cut: PieceCut | None = None  # the capture in progress (the engine thread, at start-up only)


@contextlib.contextmanager
def cutting_pieces(cut: PieceCut) -> Iterator[None]:
    """Attention calls go to `cut` for as long as the context lasts (a piecewise capture)."""
    global _piece_cut
    _piece_cut = cut
    try:
        yield
    finally:
        _piece_cut = None


def piece_cut() -> PieceCut | None:
    """The piecewise capture in progress, if any."""
    return _piece_cut


class PagedAttention(nn.Module):
    """Writes the new tokens' K/V into the cache, then attends over each sequence's whole context
    (or its last `sliding_window` positions), scores optionally soft-capped (Gemma 2), with
    optional learned attention sinks (gpt-oss: `sinks` [num_heads], one logit per head that joins
    every softmax's denominator; this rank's heads under tensor parallelism)."""

    def __init__(
        self,
        ops: KernelOps,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,  # default head_dim ** -0.5
        sliding_window: int = 0,  # > 0: a query at position p sees keys at positions > p - window
        soft_cap: float = 0.0,  # > 0: scores := soft_cap * tanh(scores / soft_cap)
        sinks: bool = False,  # a learned sink logit per head (the `sinks` parameter)
    ) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # Passed to the ops only when set, so full-attention layers call them exactly as before.
        self.masks: dict[str, float] = {}
        if sliding_window > 0:
            self.masks["sliding_window"] = sliding_window
        if soft_cap > 0:
            self.masks["soft_cap"] = soft_cap
        self.sinks = nn.Parameter(torch.empty(num_heads)) if sinks else None
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        # Layer-wise push (kv_layerwise.py): told after this layer's KV write; bound with the cache.
        self.layer_signal: LayerSignal | None = None
        self.layer_index = 0

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        assert self.kv_cache is not None, "KV cache not bound (ModelRunner binds it at start)"
        self.ops.write_kv_cache(k, v, self.kv_cache, meta.slot_mapping)
        if self.layer_signal is not None:
            self.layer_signal.written(self.layer_index)
        return self._attend(q, meta)

    def rotate_write_attend(
        self,
        q: torch.Tensor,  # [T, Hq, D] before rotary
        k: torch.Tensor,  # [T, Hkv, D] before rotary
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
        rms_input: torch.Tensor | None = None,  # [T, hidden]: scale q/k/v by its 1/rms first
        rms_eps: float = 0.0,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Rotary and the KV write in one kernel (`ops.rotary_write_kv_cache`), then attention; a
        decode step on the GPU does all of it in the attention kernel (`ops.rotary_write_attention`).
        `rms_input` only with `ops.rotary_write_attention` (folded models, `ops.attention_scales_rms`)."""
        assert self.kv_cache is not None, "KV cache not bound (ModelRunner binds it at start)"
        # A decode step does all of it in the attention kernel. (Not while capturing a prefill
        # step's pieces: their attention runs between the pieces, prefill_graph.py.)
        capture = _piece_cut
        if self.ops.rotary_write_attention is not None and capture is None:
            out = self.ops.rotary_write_attention(
                q,
                k,
                v,
                self.kv_cache,
                meta.slot_mapping,
                meta.positions,
                meta.cos_sin_cache,
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens,
                self.scale,
                meta.max_seqlen_q,
                rms_input,
                rms_eps,
                num_decode_rows=meta.num_decode_rows,
                **self.attention_options(),
            )
            if self.layer_signal is not None:
                self.layer_signal.written(self.layer_index)
            return out
        assert self.ops.rotary_write_kv_cache is not None and rms_input is None
        q = self.ops.rotary_write_kv_cache(
            q,
            k,
            v,
            self.kv_cache,
            meta.slot_mapping,
            meta.positions,
            meta.cos_sin_cache,
            **({} if capture is None else {"out": capture.query_buffer(q)}),
        )
        if self.layer_signal is not None:
            self.layer_signal.written(self.layer_index)
        return self._attend(q, meta)

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        assert self.kv_cache is not None
        capture = _piece_cut
        if capture is not None:  # capturing a prefill step's pieces: the attention runs at replay
            return capture.cut(self, q)
        return self.ops.paged_attention(
            q,
            self.kv_cache,
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.seq_lens,
            self.scale,
            meta.max_seqlen_q,
            num_decode_rows=meta.num_decode_rows,
            **self.attention_options(),
        )

    def attention_options(self) -> dict[str, Any]:
        """The optional keyword arguments of the attention ops: only those this layer uses, so a
        plain layer calls them exactly as before."""
        if self.sinks is None:
            return self.masks
        return {**self.masks, "sinks": self.sinks}


class RMSNorm(nn.Module):
    def __init__(self, ops: KernelOps, size: int, eps: float) -> None:
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
