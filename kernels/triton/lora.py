"""Multi-LoRA in one batch (punica / S-LoRA style): each row applies its own adapter's low-rank
update, y += (x @ A_s^T) @ B_s^T, as two segmented kernels over the whole batch: `lora_shrink`
(x [T, K] -> t [P, T, R], fp32 partial sums over P slices of K) and `lora_expand`
(y [T, N] += (sum_p t[p]) @ B^T).

The rows are grouped by adapter slot on the host (services/worker/layers/lora.py LoRAMapping):
slot s owns sorted_token_ids[seg_starts[s] : + seg_lens[s]]. A segment is cut into tiles of
BLOCK_M rows, and the grid's first axis runs over tiles, not over (slot, row block) pairs: program i
finds its tile from the segment lengths (`_find_tile`, a prefix sum over the S lengths in
registers), so each adapter's A and B are read once per tile of its rows and no program exists for
a (slot, block) pair that has no rows. The segments of T rows have at most T // BLOCK_M + min(S, T)
tiles (each nonempty segment's last tile may be partial), the grid's size: a function of T and the
pool size only, never of the mix of adapters, so one CUDA graph serves every mix, and programs past
the last tile return at once (a (slot, block) grid had S * cdiv(T, BLOCK_M) programs: at T = 64
and 16 slots of 4 rows each, 64 of which 48 returned at once, in every column block).
Layouts and semantics: kernels/reference.py (`lora_shrink`, `lora_expand`, the twins).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Rows of a segment per program: tl.dot needs >= 16, and a decode step has a few rows per adapter.
_BLOCK_M = 16
# Partial sums the expand kernel loads at once ([chunk, rows, rank] tiles, then a fixed-order tree
# sum): a decode-sized expand is bound by these dependent loads' latency, not by bytes, so they are
# issued together, not one per loop iteration (28 for Llama-3.1-8B's down_proj); the chunk bounds
# the registers they take.
_P_CHUNK = 8


@dataclass(frozen=True)
class LoRAKernelConfig:
    """The launch choices of launches of more than SMALL_ROWS rows, whose best values depend on the
    GPU (benchmarks/lora_bench.py --kernel-configs measures them against each other); process-wide
    (`set_config`), read when a kernel is launched, so a CUDA graph keeps the choice it was
    captured with. Launches of at most SMALL_ROWS rows (decode at small batches: one row tile per
    adapter, whose parallelism comes from K and the columns alone) always take the defaults."""

    # Columns of x one shrink program reduces: a decode step has one row tile per adapter, so the
    # parallelism comes from splitting K (14336 for Llama-3.1-8B's down_proj: 28 programs at 512,
    # not one program looping over all of it); the expand kernel adds the partial sums up, in a
    # fixed order (atomics would make the result depend on the programs' timing, a separate sum
    # costs a launch). Wider chunks: fewer programs and partial sums, each program longer.
    k_chunk: int = 512
    # Output columns an expand program covers, in steps of its column block (128): a wider program
    # loads the shrink's partial sums (and its rows' ids) once for more of B and y, a narrower one
    # makes more programs.
    expand_columns: int = 128
    num_warps: int = 4  # of both kernels

    @classmethod
    def parse(cls, text: str) -> LoRAKernelConfig:
        """`k_chunk=1024,expand_columns=512` (fields not named keep their defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, int] = {}
        for item in filter(None, text.split(",")):
            name, _, value = item.partition("=")
            if name.strip() not in fields or not value.strip().isdigit() or int(value) <= 0:
                raise ValueError(
                    f"LoRA kernel config {text!r}: expected name=positive integer of {sorted(fields)}"
                )
            values[name.strip()] = int(value)
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


SMALL_ROWS = 8
_SMALL_ROWS_CONFIG = LoRAKernelConfig()
# launches of more than SMALL_ROWS rows: the best of the device A/B (docs/lora.md, Performance:
# lora_kernel_bench's fastest at 16, 32 and 64 rows)
DEFAULT_CONFIG = LoRAKernelConfig(k_chunk=1024, expand_columns=512)
_config = DEFAULT_CONFIG


def config() -> LoRAKernelConfig:
    return _config


def _launch_config(rows: int) -> LoRAKernelConfig:
    return _SMALL_ROWS_CONFIG if rows <= SMALL_ROWS else _config


def set_config(new: LoRAKernelConfig) -> None:
    """The launch choices of every later launch (captured graphs keep theirs)."""
    global _config
    _config = new


def max_tiles(rows: int, num_slots: int) -> int:
    """The most row tiles the segments of `rows` rows over `num_slots` slots can have (module
    docstring): the grid's first axis."""
    return rows // _BLOCK_M + min(num_slots, rows)


@triton.jit
def _find_tile(lens_ptr, starts_ptr, NUM_SLOTS, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr):
    """(slot, row block in the slot's segment, segment length, segment start) of this program's
    tile; past the last tile: a block past its (empty) segment, which the caller skips. The starts
    are loaded beside the lengths, not after the slot is known: one memory round trip less before
    the rows' ids."""
    tile = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    lens = tl.load(lens_ptr + offs_s, mask=offs_s < NUM_SLOTS, other=0)
    starts = tl.load(starts_ptr + offs_s, mask=offs_s < NUM_SLOTS, other=0)
    tiles = (lens + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)  # tiles of slots [0, s]
    slot = tl.sum((ends <= tile).to(tl.int32), axis=0)  # the first slot whose tiles reach past it
    before = tl.sum(tl.where(offs_s < slot, tiles, 0), axis=0)
    seg_len = tl.sum(tl.where(offs_s == slot, lens, 0), axis=0)
    seg_start = tl.sum(tl.where(offs_s == slot, starts, 0), axis=0)
    return slot, tile - before, seg_len, seg_start


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [S, R, K]
    out_ptr,  # [SPLIT_K, T, R] fp32: one partial sum per K chunk
    ids_ptr,  # [>= T] int32 rows sorted by slot
    starts_ptr,  # [S] int32
    lens_ptr,  # [S] int32
    K,
    R,
    stride_xm,
    stride_as,
    stride_ar,
    stride_os,
    stride_om,
    K_CHUNK,  # columns of x per program (a multiple of BLOCK_K)
    NUM_SLOTS,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products (no TF32)
):
    slot, block, seg_len, seg_start = _find_tile(lens_ptr, starts_ptr, NUM_SLOTS, BLOCK_S, BLOCK_M)
    split = tl.program_id(1)
    if block * BLOCK_M < seg_len:
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        rows = tl.load(ids_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        k_start = split * K_CHUNK
        for k0 in range(k_start, k_start + K_CHUNK, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            a = tl.load(  # [BLOCK_K, BLOCK_R]: A^T
                a_base + offs_r[None, :] * stride_ar + offs_k[:, None],
                mask=mask_r[None, :] & mask_k[:, None],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        out = out_ptr + split.to(tl.int64) * stride_os
        tl.store(
            out + rows[:, None] * stride_om + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :]
        )


@triton.jit
def _lora_expand_kernel(
    y_ptr,  # [T, N]
    t_ptr,  # [P, T, R] fp32
    b_ptr,  # [S, N, R], or with parts [S, N, PART_RANK]: each column's own part's ranks only
    ids_ptr,
    starts_ptr,
    lens_ptr,
    N,
    R,
    stride_ym,
    stride_tp,
    stride_tm,
    stride_bs,
    stride_bn,
    PART1,  # first output column of part 1 (N when there is none)
    PART2,  # first output column of part 2 (N when there is none)
    NUM_SLOTS,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COLUMNS: tl.constexpr,  # output columns per program, a multiple of BLOCK_N
    BLOCK_R: tl.constexpr,
    PART_RANK: tl.constexpr,  # > 0: part j's columns use only t's rank columns [j, j + 1) * PART_RANK
    P: tl.constexpr,  # partial sums over K (a function of K only: one compile per projection shape)
    P_CHUNK: tl.constexpr,  # partial sums loaded at once (a power of two)
    IEEE: tl.constexpr,
):
    slot, block, seg_len, seg_start = _find_tile(lens_ptr, starts_ptr, NUM_SLOTS, BLOCK_S, BLOCK_M)
    if block * BLOCK_M < seg_len:
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        rows = tl.load(ids_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # the shrink's partial sums over K: unrolled, each chunk's loads issued at once; once for
        # all of the program's columns
        offs_p = tl.arange(0, P_CHUNK)
        t_ptrs = t_ptr + rows[None, :, None] * stride_tm + offs_r[None, None, :]
        mask_t = mask_m[None, :, None] & mask_r[None, None, :]
        t_sum = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for p0 in tl.static_range(0, P, P_CHUNK):
            p = p0 + offs_p
            part_sums = tl.load(
                t_ptrs + p[:, None, None].to(tl.int64) * stride_tp,
                mask=mask_t & (p < P)[:, None, None],
                other=0.0,
            )
            t_sum += tl.sum(part_sums, axis=0)
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        t = t_sum.to(b_ptr.dtype.element_ty)
        for n0 in tl.static_range(0, COLUMNS, BLOCK_N):
            offs_n = tl.program_id(1) * COLUMNS + n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_b = mask_n[None, :] & mask_r[:, None]
            b_cols = offs_r[:, None]
            if PART_RANK > 0:
                # a fused projection: B holds each column's own part's PART_RANK ranks (a 32-byte
                # row at rank 16, read whole), and the B^T operand spreads them over the part's
                # rank range of t, zeros elsewhere (never read)
                part = (offs_n >= PART1).to(tl.int32) + (offs_n >= PART2).to(tl.int32)
                mask_b = mask_b & ((offs_r[:, None] // PART_RANK) == part[None, :])
                b_cols = offs_r[:, None] % PART_RANK
            b = tl.load(  # [BLOCK_R, BLOCK_N]: B^T
                b_base + offs_n[None, :] * stride_bn + b_cols,
                mask=mask_b,
                other=0.0,
            )
            delta = tl.dot(t, b, input_precision="ieee") if IEEE else tl.dot(t, b)
            y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
            mask = mask_m[:, None] & mask_n[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _block_s(num_slots: int) -> int:  # (the segment lengths _find_tile loads at once; >= 16 like _block_r)
    return max(16, triton.next_power_of_2(num_slots))


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _check_mapping(
    t_rows: int,
    sorted_token_ids: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_slots: int,
) -> None:
    assert sorted_token_ids.dtype == seg_starts.dtype == seg_lens.dtype == torch.int32
    assert sorted_token_ids.shape[0] >= t_rows and seg_starts.shape == seg_lens.shape == (num_slots,)


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    sorted_token_ids: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
) -> torch.Tensor:  # [P, T, R] fp32 partial sums (rows of no adapter undefined)
    num_slots, rank, k = lora_a.shape
    assert x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, (x.shape, x.stride(), lora_a.shape)
    assert lora_a.is_contiguous() and lora_a.dtype == x.dtype, (lora_a.dtype, x.dtype)
    _check_mapping(x.shape[0], sorted_token_ids, seg_starts, seg_lens, num_slots)
    launch = _launch_config(x.shape[0])
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    k_chunk = triton.cdiv(min(launch.k_chunk, k), block_k) * block_k
    split_k = triton.cdiv(k, k_chunk)
    partial = torch.empty(split_k, x.shape[0], rank, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return partial
    grid = (max_tiles(x.shape[0], num_slots), split_k)
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        partial,
        sorted_token_ids,
        seg_starts,
        seg_lens,
        k,
        rank,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        partial.stride(0),
        partial.stride(1),
        k_chunk,
        num_slots,
        BLOCK_S=_block_s(num_slots),
        BLOCK_M=_BLOCK_M,
        BLOCK_R=_block_r(rank),
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        num_warps=launch.num_warps,
    )
    return partial


def lora_expand(
    y: torch.Tensor,  # [T, N], updated in place
    t: torch.Tensor,  # [P, T, R] fp32
    lora_b: torch.Tensor,  # [S, N, R]; with 2-3 parts [S, N, part_rank] (kernels/reference.py)
    sorted_token_ids: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    part_starts: tuple[int, ...] = (),
    part_rank: int = 0,
    columns: int = 0,  # output columns per program (0: the config's `expand_columns`)
) -> None:
    num_slots, n_out, b_rank = lora_b.shape
    rank = t.shape[2]
    fused = len(part_starts) > 1
    assert len(part_starts) <= 3 and (not part_starts or part_rank * len(part_starts) <= rank)
    assert b_rank == (part_rank if fused else rank), (lora_b.shape, t.shape, part_starts, part_rank)
    assert y.dim() == 2 and y.shape[1] == n_out and y.stride(1) == 1, (y.shape, lora_b.shape)
    assert t.dim() == 3 and t.shape[1] == y.shape[0] and t.dtype == torch.float32 and t.stride(2) == 1
    assert lora_b.is_contiguous(), lora_b.stride()
    _check_mapping(y.shape[0], sorted_token_ids, seg_starts, seg_lens, num_slots)
    if y.shape[0] == 0:
        return
    launch = _launch_config(y.shape[0])
    block_n = min(128, max(16, triton.next_power_of_2(n_out)))
    # (a multiple of block_n, no wider than the output needs)
    columns = (
        min(triton.cdiv(columns or launch.expand_columns, block_n), triton.cdiv(n_out, block_n)) * block_n
    )
    grid = (max_tiles(y.shape[0], num_slots), triton.cdiv(n_out, columns))
    _lora_expand_kernel[grid](
        y,
        t,
        lora_b,
        sorted_token_ids,
        seg_starts,
        seg_lens,
        n_out,
        rank,
        y.stride(0),
        t.stride(0),
        t.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        *[*part_starts[1:], n_out, n_out][:2],  # PART1, PART2
        num_slots,
        BLOCK_S=_block_s(num_slots),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n,
        COLUMNS=columns,
        BLOCK_R=_block_r(rank),
        PART_RANK=part_rank if fused else 0,
        P=t.shape[0],
        P_CHUNK=min(_P_CHUNK, triton.next_power_of_2(t.shape[0])),
        IEEE=lora_b.dtype == torch.float32,
        num_warps=launch.num_warps,
    )
