"""MXFP4 weights as gpt-oss ships its experts (OCP microscaling FP4), dequantized at load.

A weight W [..., N, K] is stored as two tensors:
- `*_blocks` uint8 [..., N, K // 32, 16]: groups of 32 consecutive k, two FP4 (E2M1) codes a byte,
  the even k in the low nibble;
- `*_scales` uint8 [..., N, K // 32]: each group's power-of-two scale as a biased exponent (E8M0,
  2 ** (s - 127)).
W[..., n, g * 32 + i] = FP4_VALUES[code] * 2 ** (scales[..., n, g] - 127). gpt-oss's `gate_up_proj`
is stored this way as [E, 2I, H] (rows of gate and up interleaved) and `down_proj` as [E, H, I]:
the [out, in] layout of our stacked expert weights (transformers' `convert_moe_packed_tensors`
returns the transpose, its modules' [E, in, out] layout).
"""

from __future__ import annotations

import torch

# E2M1 code -> value (the sign is the code's top bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per scale
_CHUNK_GROUPS = 1 << 20  # groups dequantized at a time (bounds the temporaries)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., N, G, 16] codes and [..., N, G] exponents -> [..., N, G * 32] weights in `dtype`
    (exact: every value is a small multiple of a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 tensors must be uint8 (got {blocks.dtype} blocks, {scales.dtype} scales)")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
            f"(expected blocks [..., N, G, {GROUP // 2}] and scales [..., N, G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    *lead, groups, half = blocks.shape
    flat_blocks, flat_scales = blocks.reshape(-1, half), scales.reshape(-1)
    out = torch.empty((flat_blocks.shape[0], 2 * half), dtype=dtype, device=blocks.device)
    # In chunks of groups: the int64 codes and fp32 values of a whole gpt-oss-120b expert tensor
    # would be tens of GB of temporaries.
    for start in range(0, flat_blocks.shape[0], _CHUNK_GROUPS):
        part = flat_blocks[start : start + _CHUNK_GROUPS]
        codes = torch.stack((part & 0x0F, part >> 4), dim=-1).long()  # [n, 16, 2]: low nibble first
        values = lut[codes].flatten(-2)  # [n, 32]
        exponents = (flat_scales[start : start + _CHUNK_GROUPS].to(torch.int32) - 127)[:, None]
        out[start : start + _CHUNK_GROUPS] = torch.ldexp(values, exponents.float()).to(dtype)
    return out.reshape(*lead, groups * 2 * half)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of W [..., N, K] (K a multiple of 32): each group's scale is the power of two
    that brings its largest magnitude within FP4's 6, each value rounded to the nearest FP4 value.
    For tests and tools that write MXFP4 checkpoints; `dequantize_mxfp4` inverts it up to rounding."""
    *lead, k = weight.shape
    if k % GROUP:
        raise ValueError(f"MXFP4: the last dimension ({k}) must be a multiple of {GROUP}")
    w = weight.float().reshape(*lead, k // GROUP, GROUP)
    amax = w.abs().amax(dim=-1).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # amax / 2**e <= 6
    scaled = w / torch.exp2(exponent)[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # nearest value
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous()
