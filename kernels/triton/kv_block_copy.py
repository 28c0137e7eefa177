"""Copy whole KV blocks between two paged caches of one layout, in one launch.

    dst[l0:l1, :, dst_ids[i]] = src[l0:l1, :, src_ids[i]]   for every i

Both caches are [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] (their
num_blocks may differ), each block's [block_size, num_kv_heads, head_dim] contiguous, on one
device: a CUDA IPC fetch copies a prefill worker's blocks (its cache mapped into this process)
into the decode worker's. Every byte is read once and written once whatever the order of the
ids (a torch gather + scatter of scattered ids moves it twice, and slice copies need one launch
per run of consecutive ids). The blocks are moved as 32-bit words when a block's bytes allow
(any element type: bf16, fp8, fp32).

Grid: (pairs, (l1 - l0) * 2, pieces of a block); a program moves PIECE words of one block of one
layer's K or V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PIECE = 2048  # words a program moves (8 KiB of 32-bit words)


@triton.jit(do_not_specialize=["num_pairs", "layer_start"])  # (one variant for every fetch's size)
def _kv_block_copy_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,  # [2, pairs] int64: source ids, then destination ids
    num_pairs,
    layer_start,
    src_half_stride,  # words between a layer's K and its V in src (= src num_blocks * block words)
    dst_half_stride,
    BLOCK_WORDS: tl.constexpr,  # words of one block of one layer's K (or V)
    PIECE: tl.constexpr,
    CACHE: tl.constexpr,  # the loads' and stores' cache modifier ("" or ".cg")
):
    pair = tl.program_id(0)
    layer_half = tl.program_id(1)
    piece = tl.program_id(2)
    layer = (layer_start + layer_half // 2).to(tl.int64)
    half = (layer_half % 2).to(tl.int64)
    src_block = tl.load(ids_ptr + pair)
    dst_block = tl.load(ids_ptr + num_pairs + pair)
    offs = piece * PIECE + tl.arange(0, PIECE)
    mask = offs < BLOCK_WORDS
    src_at = (layer * 2 + half) * src_half_stride + src_block * BLOCK_WORDS
    dst_at = (layer * 2 + half) * dst_half_stride + dst_block * BLOCK_WORDS
    words = tl.load(src_ptr + src_at + offs, mask=mask, cache_modifier=CACHE)
    tl.store(dst_ptr + dst_at + offs, words, mask=mask, cache_modifier=CACHE)


def _words(cache: torch.Tensor) -> torch.Tensor:
    """The cache as 32-bit words when each block row's bytes divide into them, else as itself."""
    row_bytes = cache.shape[-1] * cache.element_size()
    if row_bytes % 4 == 0 and cache.element_size() <= 4:
        return cache.view(torch.int32)
    return cache


def copy_kv_blocks(
    src: torch.Tensor,  # [L, 2, NB_src, BS, Hkv, D], contiguous
    dst: torch.Tensor,  # [L, 2, NB_dst, BS, Hkv, D], contiguous, src's dtype and device
    src_ids: list[int],
    dst_ids: list[int],
    layers: tuple[int, int],
    piece: int = PIECE,
    num_warps: int = 4,
    cache: str = ".cg",
) -> None:
    """dst[l0:l1, :, dst_ids] = src[l0:l1, :, src_ids], in place, one launch (plus one host ->
    device copy of the ids, from pinned memory on CUDA: queued on the current stream, no host
    wait). The ids in `dst_ids` must be distinct (no two copies to one block); src and dst are
    different tensors."""
    assert len(src_ids) == len(dst_ids), (len(src_ids), len(dst_ids))
    assert src.dtype == dst.dtype and src.device == dst.device, (src.dtype, dst.dtype, src.device, dst.device)
    assert src.dim() == 6 and src.shape[0] == dst.shape[0] and src.shape[3:] == dst.shape[3:], (
        src.shape,
        dst.shape,
    )
    assert src.is_contiguous() and dst.is_contiguous(), "caches must be contiguous"
    l0, l1 = layers
    if not src_ids or l1 <= l0:
        return
    src_words, dst_words = _words(src), _words(dst)
    block_words = src_words[0, 0, 0].numel()
    # (a pageable copy would wait for the device before the launch; the pinned buffer is kept
    # from reuse until the copy has read it: torch's pinned allocator records it on the stream)
    ids = torch.tensor([src_ids, dst_ids], dtype=torch.int64, pin_memory=src.is_cuda)
    ids = ids.to(src.device, non_blocking=True)
    grid = (len(src_ids), (l1 - l0) * 2, triton.cdiv(block_words, piece))
    _kv_block_copy_kernel[grid](
        src_words,
        dst_words,
        ids,
        len(src_ids),
        l0,
        src_words.stride(1),
        dst_words.stride(1),
        BLOCK_WORDS=block_words,
        PIECE=piece,
        CACHE=cache,
        num_warps=num_warps,
    )
