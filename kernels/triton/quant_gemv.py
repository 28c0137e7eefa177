"""Few-row (M <= 4: decode) weight-only quantized GEMV over 32-bit words: y = x @ dequant(W).T,
the `words` configs of the quantized GEMM's tuner (quant_gemm.py: the config type, the dispatch and
the tuning live there; this file is the kernel).

The weight layouts are those of `kernels/reference.py` `quant_linear`, unchanged (every loader keeps
working): int8 [N, K], e4m3 [N, K], or 4-bit codes two a byte along K as uint8 [N, K // 2] (even k
in the low nibble); scales [N, G] fp32, optional zero points [N, G]. The kernel reads them as int32
words ([N, K // 4] or [N, K // 8]: four 8-bit or eight 4-bit codes a word, code j of word w is
column CPW * w + j, the little-endian order of the bytes and nibbles); nothing is reordered:
- tiles are [BLOCK_W words, BLOCK_N rows, BLOCK_M x rows], words first, and the word index is not
  seen as contiguous: every load of the K loop (words, x, scales, zeros) then takes one layout
  (threads and warps along the words; each warp load reads 128 contiguous bytes of a row; a
  thread's rows and x rows in its registers), so no tile crosses shared memory in the loop. (As
  16-byte vectors the words took a layout of their own, unlike the strided x loads, and every code
  plane was converted through shared memory.) The bytes in flight come from the BLOCK_N rows a
  thread holds, and with PREFETCH the next tile's words (Triton pipelines only loads feeding a dot);
- code j of every word is taken out with one mask-and-or (one LOP3) into the mantissa of 2^23
  ((word & (mask << s)) | 0x4B000000 read as fp32 is 2^23 + code * 2^s), and one subtraction of the
  constant 2^23 + offset * 2^s leaves (code - offset) * 2^s exactly (int8: the byte's top bit
  flipped first, offset 128; 4-bit: offset 8, or 0 with zero points). The 2^s (s < 23; the top
  codes of a word are shifted down once a word) meets x: x's column of code j is loaded once a
  tile as its own strided vector and scaled by 2^-s (exact), amortized over the tile's rows. No
  int -> float conversion instruction (a quarter-rate pipe), no `tl.interleave` / reshape;
- e4m3 codes are bytes of the word converted by Triton (hardware e4m3 conversions; a paired
  conversion of each 16-bit half by inline PTX took 40% fewer instructions in the loop and no time
  off the decode step, round 23 in docs/benchmarks.md: the loop is not bound by its instructions);
- where N is a multiple of the rows a program takes and K of a tile (`EVEN`: every model shape
  with the tuned configs) the loop's loads carry no masks: no predicate per load, and the loads'
  L2 hint (evict first) is built once before the loop instead of per load;
- products are summed on the CUDA cores into a [BLOCK_W, BLOCK_N, BLOCK_M] fp32 accumulator (no
  16-row tensor-core padding for one row), reduced once after the loop;
- a group's scale (and zero point, as zero * sum(x) of the word) meets the word's partial sum once,
  not each code: one scale per row a tile where the group holds whole tiles, else one per word
  (a word never spans two groups: the group size is a multiple of the codes a word); per channel
  (G = 1) the scale multiplies the final sums.
No split-K: every program owns BLOCK_N whole output rows, so the sum order is fixed (CUDA graphs on
and off agree bitwise) and the epilogues (folded norm weight, 1/rms, bias, SiLU-and-mul of a fused
[gate; up], residual) run in the same launch, as in quant_gemm.py; small BLOCK_N gives the grid
enough programs (N / BLOCK_N of them) to keep every SM streaming.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl

MAX_ROWS = 4  # the rows one launch takes (BLOCK_M, a power of two >= M)
_MAGIC = tl.constexpr(8388608.0)  # 2^23: an integer below 2^23 or'ed into its mantissa is exact


def codes_per_word(bits: int) -> int:
    return 32 // bits


def supports(qweight: torch.Tensor, k: int, bits: int, group_size: int, block_k: int) -> str | None:
    """Why the word kernel cannot run this weight (None: it can): the rows must be whole 4-byte
    words and a word must lie in one group."""
    cpw = codes_per_word(bits)
    if k % cpw:
        return f"K={k} is not a multiple of the {cpw} codes a word"
    if qweight.stride(-1) != 1 or (qweight.stride(0) * qweight.element_size()) % 4 or qweight.data_ptr() % 4:
        return "the weight rows are not 4-byte aligned words"
    if group_size % cpw:
        return f"groups of {group_size} split the words of {cpw} codes"
    if block_k % cpw:
        return f"tiles of {block_k} columns are not whole words"
    return None


@triton.jit(do_not_specialize=["word_step", "magic_bits"])
def _quant_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K // CPW] int32 words
    s_ptr,  # [N, G] fp32
    z_ptr,  # [N, G] fp32 (unused without HAS_ZEROS)
    b_ptr,  # [N] (unused without HAS_BIAS)
    y_ptr,  # [M, N], or [M, N // 2] (GATED)
    g_ptr,  # [K] the folded norm's weight (unused without NORM)
    r_ptr,  # [M, N] residual (unused without HAS_RESIDUAL)
    M,
    N,
    K,
    group_size,
    num_groups,
    stride_xm,
    stride_wn,  # in words
    word_step,  # 1 (a runtime value: see the load)
    magic_bits,  # 0x4B000000, the bits of 2^23 (a runtime value: one register, so the mask-and-or
    # of a code is one LOP3 instruction: LOP3 takes one immediate, the mask)
    stride_ym,
    stride_rm,
    BITS: tl.constexpr,
    FP8: tl.constexpr,  # the 8-bit codes are e4m3 bit patterns
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALES: tl.constexpr,  # 0: per channel (at the end), 1: one group a tile, 2: one group a word
    NORM: tl.constexpr,  # x * norm weight (per column) before the product
    RMS_EPS: tl.constexpr,  # None: off; else the sums times rsqrt(mean(x^2) + eps) of each x row
    GATED: tl.constexpr,  # W is [gate; up] (N = 2 I rows): out[m, i] = silu(gate[m, i]) * up[m, i]
    HAS_RESIDUAL: tl.constexpr,
    EARLY_SIGNAL: tl.constexpr,  # let the next kernel launch right after the wait (pdl.py)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words a row a tile
    PREFETCH: tl.constexpr,  # load the next tile's words before summing this one's
    EVEN: tl.constexpr,  # N a multiple of the rows a program takes and K of SPAN: no masks in the loop
    PDL: tl.constexpr,
):
    CPW: tl.constexpr = 32 // BITS  # codes a word
    SPAN: tl.constexpr = BLOCK_W * CPW  # K columns a tile
    MASK: tl.constexpr = (1 << BITS) - 1
    # positions (bit offsets / BITS) a code is read at without a shift: below bit 23 (the 2^23 magic)
    LOW: tl.constexpr = 5 if BITS == 4 else 2
    HI_SHIFT: tl.constexpr = 12 if BITS == 4 else 16  # the word shifted down for the codes from LOW
    OFFSET: tl.constexpr = 128 if BITS == 8 else (0 if HAS_ZEROS else 8)
    pid_n = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2  # (GATED) outputs a program computes
    if GATED:
        # the program's W rows: its HALF outputs' gate rows, then their up rows (I = N // 2 further)
        j_n = tl.arange(0, BLOCK_N)
        out_j = pid_n * HALF + j_n % HALF
        mask_n = out_j < N // 2
        offs_n = out_j + (j_n // HALF) * (N // 2)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Tiles are [BLOCK_W, BLOCK_N, BLOCK_M]: words first. Every load of the loop (words, x, scales)
    # then has the same layout (threads and warps along the words, a thread's rows and x rows in
    # its registers), so nothing is converted between layouts inside the loop (a shared-memory
    # round trip per code).
    w3 = tl.arange(0, BLOCK_W)[:, None, None]  # [BW, 1, 1]
    n3 = offs_n[None, :, None]  # [1, BN, 1]
    mask_n3 = mask_n[None, :, None]
    mask_m3 = mask_m[None, None, :]  # [1, 1, BM]
    w_rows = w_ptr + n3.to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[None, None, :].to(tl.int64) * stride_xm
    words_per_row = K // CPW
    acc = tl.zeros((BLOCK_W, BLOCK_N, BLOCK_M), dtype=tl.float32)
    if RMS_EPS is not None:
        x_sq = tl.zeros((BLOCK_W, 1, BLOCK_M), dtype=tl.float32)
    if HAS_ZEROS and SCALES == 0:
        x_tot = tl.zeros((BLOCK_W, 1, BLOCK_M), dtype=tl.float32)  # sum of x over K: the zero's share
    pdl.enter(PDL)  # see pdl.py: nothing above reads an activation
    if EARLY_SIGNAL:
        pdl.leave(PDL)
    # the word index in the row, times a runtime 1: a load seen as contiguous would take a 16-byte
    # vector layout of its own, unlike the x loads (strided: one code position of each word); one
    # word a thread and row still reads 128 contiguous bytes of a row per warp
    w_cols = w3 * word_step  # [BW, 1, 1]
    if PREFETCH:
        # the next tile's words are loaded before this tile's codes are summed (two tiles in flight
        # a warp: Triton pipelines only loads that feed a dot)
        w_next = tl.load(
            w_rows + w_cols, mask=mask_n3 & (w_cols < words_per_row), other=0, eviction_policy="evict_first"
        )
    for k0 in range(0, K, SPAN):
        kw = k0 // CPW + w_cols
        w_mask = mask_n3 & (kw < words_per_row)
        if PREFETCH:
            words = w_next
            kn = kw + BLOCK_W
            # (the prefetch past the last tile stays masked: it would read beyond the row)
            w_next = tl.load(
                w_rows + kn, mask=mask_n3 & (kn < words_per_row), other=0, eviction_policy="evict_first"
            )
        elif EVEN:
            words = tl.load(w_rows + kw, eviction_policy="evict_first")  # [BW, BN, 1]
        else:
            words = tl.load(w_rows + kw, mask=w_mask, other=0, eviction_policy="evict_first")  # [BW, BN, 1]
        kx = k0 + CPW * w3  # the column of each word's code 0
        x_mask = mask_m3 & (kx < K)
        if BITS == 8 and not FP8:
            words = words ^ -2139062144  # 0x80808080: each byte's top bit flipped, q + 128 in [0, 255]
        if not FP8:
            hi = words >> HI_SHIFT
        if SCALES != 0:
            part = tl.zeros((BLOCK_W, BLOCK_N, BLOCK_M), dtype=tl.float32)
        if HAS_ZEROS:
            x_word = tl.zeros((BLOCK_W, 1, BLOCK_M), dtype=tl.float32)  # sum of x over each word
        for j in tl.static_range(CPW):
            if EVEN:
                xj = tl.load(x_rows + kx + j, mask=mask_m3, other=0.0)  # [BW, 1, BM]: code j's columns
            else:
                xj = tl.load(x_rows + kx + j, mask=x_mask, other=0.0)
            if RMS_EPS is not None:
                x_sq += xj.to(tl.float32) * xj.to(tl.float32)
            if NORM:
                gj = tl.load(g_ptr + kx + j, mask=kx < K, other=0.0).to(tl.float32)
                # rounded to x's dtype, as the norm's output is
                xj = (xj.to(tl.float32) * gj).to(x_ptr.dtype.element_ty)
            xf = xj.to(tl.float32)
            if HAS_ZEROS:
                x_word += xf
            if FP8:
                code = ((words >> (8 * j)) & 0xFF).to(tl.uint8)
                wv = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                pos = j - (j >= LOW) * (HI_SHIFT // BITS)  # the code's position in src (constexpr)
                src = words if j < LOW else hi
                field = (src & (MASK << (BITS * pos))) | magic_bits
                wv = field.to(tl.float32, bitcast=True) - (_MAGIC + OFFSET * (1 << (BITS * pos)))
                if pos > 0:
                    xf = xf * (1.0 / (1 << (BITS * pos)))  # exact: a power of two
            if SCALES == 0:
                acc += wv * xf
            else:
                part += wv * xf
        if HAS_ZEROS and SCALES == 0:
            x_tot += x_word
        if SCALES != 0:
            # (the pointers span the words axis too, for the loop's one layout)
            if SCALES == 1:
                sg = n3 * num_groups + (k0 // group_size + 0 * w3)  # [BW, BN, 1]
            else:
                sg = n3 * num_groups + kx // group_size  # [BW, BN, 1]
            if HAS_ZEROS:
                part -= tl.load(z_ptr + sg, mask=w_mask, other=0.0) * x_word
            acc += tl.load(s_ptr + sg, mask=w_mask, other=0.0) * part
    if not EARLY_SIGNAL:
        pdl.leave(PDL)  # the weights are read: the next kernel may launch and wait on this one
    out = tl.sum(acc, axis=0)  # [BLOCK_N, BLOCK_M]
    if SCALES == 0:
        if HAS_ZEROS:
            out -= tl.sum(x_tot, axis=0) * tl.load(z_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        out = out * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if RMS_EPS is not None:
        out = out * tl.rsqrt(tl.sum(x_sq, axis=0) / K + RMS_EPS)  # [1, BM]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(out, [2, HALF, BLOCK_M]), (1, 2, 0)))  # [HALF, BM]
        out_cols = pid_n * HALF + tl.arange(0, HALF)
        tl.store(
            y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + out_cols[:, None],
            (gate / (1.0 + tl.exp(-gate)) * up).to(y_ptr.dtype.element_ty),
            mask=mask_m[None, :] & (out_cols < N // 2)[:, None],
        )
        return
    out_mask = mask_n[:, None] & mask_m[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(
            r_ptr + offs_m[None, :].to(tl.int64) * stride_rm + offs_n[:, None], mask=out_mask, other=0.0
        )
        out += residual.to(tl.float32)
    tl.store(
        y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None],
        out.to(y_ptr.dtype.element_ty),
        mask=out_mask,
    )


def quant_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS, stride(1) == 1
    qweight: torch.Tensor,
    scales: torch.Tensor,  # [N, G] fp32 contiguous
    bits: int,
    zeros: torch.Tensor | None,  # [N, G] fp32 contiguous
    bias: torch.Tensor | None,
    y: torch.Tensor,  # [M, N], or [M, N // 2] gated: the output
    block_n: int,
    block_k: int,  # K columns a tile
    num_warps: int,
    tiles_in_flight: int,  # 1, or 2: the next tile's words loaded before this one's are summed
    norm_weight: torch.Tensor | None = None,
    rms_eps: float | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    early_signal: bool = False,
) -> torch.Tensor:
    """The launch behind a `words` config of `quant_gemm.quant_gemm` (which checks the operands;
    its docstring gives the fusions' contract). Returns y."""
    m, k = x.shape
    n = qweight.shape[0]
    assert m <= MAX_ROWS, m
    num_groups = scales.shape[1]
    group_size = k // num_groups
    why = supports(qweight, k, bits, group_size, block_k)
    if why is not None:
        raise ValueError(f"quant_linear: the word GEMV cannot run this weight: {why}")
    fp8 = qweight.dtype == torch.float8_e4m3fn
    if fp8 and zeros is not None:
        raise ValueError("quant_linear: e4m3 codes take no zero points")
    cpw = codes_per_word(bits)
    words = qweight.view(torch.uint8).view(torch.int32) if fp8 else qweight.view(torch.int32)
    if num_groups == 1:
        scale_mode = 0
    elif group_size % block_k == 0:
        scale_mode = 1
    else:
        scale_mode = 2
    columns = triton.cdiv(n // 2, block_n // 2) if gated else triton.cdiv(n, block_n)
    rows_even = (n // 2) % (block_n // 2) == 0 if gated else n % block_n == 0
    even = rows_even and k % block_k == 0
    _quant_gemv_kernel[(columns,)](
        x,
        words,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        y,
        norm_weight if norm_weight is not None else scales,
        residual if residual is not None else y,
        m,
        n,
        k,
        group_size,
        num_groups,
        x.stride(0),
        words.stride(0),
        1,
        0x4B000000,
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        BITS=bits,
        FP8=fp8,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        SCALES=scale_mode,
        NORM=norm_weight is not None,
        RMS_EPS=rms_eps,
        GATED=gated,
        HAS_RESIDUAL=residual is not None,
        EARLY_SIGNAL=early_signal,
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=block_n,
        BLOCK_W=block_k // cpw,
        PREFETCH=tiles_in_flight > 1,
        EVEN=even,
        num_warps=num_warps,
        num_stages=1,
        **pdl.launch_options(x.device),
    )
    return y
