"""kernels/triton/kv_block_copy.py: whole KV blocks copied between two caches of one layout in one
launch, bit for bit equal to indexing (`dst[l0:l1, :, dst_ids] = src[l0:l1, :, src_ids]`) for
consecutive, scattered and single ids, layer ranges, caches of different block counts, element
types whose blocks go as 32-bit words (fp32, fp16, bf16, fp8) and one that does not (an odd fp8
head dim). CPU: Triton's interpreter; `gpu`: the same cases on CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_cases import skip_without

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def kv_block_copy():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    return importlib.import_module("kernels.triton.kv_block_copy")


def _cache(
    layers: int,
    blocks: int,
    tail: tuple[int, int, int],
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> torch.Tensor:
    values = torch.randn(layers, 2, blocks, *tail, generator=gen) * 4
    return values.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_copy_equals_indexing(kv_block_copy, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(11)
    # (layers, src blocks, dst blocks, [block_size, heads, head_dim]): a block of 512 words, one
    # of several pieces (PIECE words each), and (fp8) rows of 6 bytes that are no whole words
    shapes = [(3, 40, 24, (4, 2, 8)), (2, 9, 17, (16, 8, 128))]
    if dtype == torch.float8_e4m3fn:
        shapes.append((2, 7, 5, (3, 1, 6)))
    for layers, src_blocks, dst_blocks, tail in shapes:
        src = _cache(layers, src_blocks, tail, dtype, device, gen)
        n = min(src_blocks, dst_blocks)
        cases = [
            (list(range(1, 1 + n // 2)), list(range(n // 2, n // 2 + n // 2))),  # consecutive
            (
                torch.randperm(src_blocks, generator=gen)[:n].tolist(),
                torch.randperm(dst_blocks, generator=gen)[:n].tolist(),
            ),
            ([src_blocks - 1], [0]),  # the last block of one into the first of the other
        ]
        for src_ids, dst_ids in cases:
            for span in ((0, layers), (layers - 1, layers)):
                dst = _cache(layers, dst_blocks, tail, dtype, device, gen)
                want = dst.clone()
                l0, l1 = span
                want[l0:l1, :, dst_ids] = src[l0:l1][:, :, src_ids]
                kv_block_copy.copy_kv_blocks(src, dst, src_ids, dst_ids, span)
                # compared as bytes: fp8 has no equality on some builds, and bit equality is the claim
                assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8)), (
                    tail,
                    src_ids,
                    dst_ids,
                    span,
                )


def test_nothing_to_copy_changes_nothing(kv_block_copy) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(2)
    src = _cache(2, 4, (4, 2, 8), torch.float32, "cpu", gen)
    dst = _cache(2, 4, (4, 2, 8), torch.float32, "cpu", gen)
    before = dst.clone()
    kv_block_copy.copy_kv_blocks(src, dst, [], [], (0, 2))
    kv_block_copy.copy_kv_blocks(src, dst, [1], [2], (1, 1))
    assert torch.equal(dst, before)


@pytest.mark.gpu
def test_compiles_once_over_fetch_sizes_and_layer_ranges(kv_block_copy) -> None:  # type: ignore[no-untyped-def]
    """A fetch's block count and first layer vary from request to request: Triton's default
    specialization (a value of 1, multiples of 16, the rest) would compile a variant for each
    class mid-serving, on the engine thread."""
    skip_without("cuda")
    gen = torch.Generator().manual_seed(3)
    src = _cache(4, 40, (16, 2, 64), torch.bfloat16, "cuda", gen)
    dst = _cache(4, 40, (16, 2, 64), torch.bfloat16, "cuda", gen)
    kernel = kv_block_copy._kv_block_copy_kernel
    first = None
    for n, span in [(1, (0, 4)), (16, (1, 3)), (7, (3, 4)), (32, (0, 1)), (17, (2, 4))]:
        kv_block_copy.copy_kv_blocks(src, dst, list(range(n)), list(range(40 - n, 40)), span)
        count = len(kernel.device_caches[torch.cuda.current_device()][0])
        first = first or count
        assert count == first, (n, span)
