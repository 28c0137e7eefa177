"""The fused MoE kernel against its reference twin: random, skewed (every token to one expert) and
sparse (most experts empty) routings, decode- and prefill-sized token counts."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for

from kernels import reference

# (tokens, hidden, intermediate, experts, top_k)
SHAPES = [(1, 64, 32, 4, 2), (7, 64, 48, 8, 2), (40, 64, 32, 16, 4), (80, 32, 16, 4, 1)]


def _inputs(
    shape: tuple[int, int, int, int, int], device: str, dtype: torch.dtype, routing: str, seed: int
) -> tuple[torch.Tensor, ...]:
    tokens, hidden, inter, experts, top_k = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen)
    if routing == "one-expert":  # every token's first choice is expert 0
        logits[:, 0] += 100.0
    elif routing == "sparse":  # only experts 1 and experts-1 are ever chosen
        logits[:, 1:-1] -= 100.0
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if routing == "sparse" and top_k > 2:
        ids = ids.clamp(max=experts - 1)
    to = {"device": device, "dtype": dtype}
    return x.to(**to), w13.to(**to), w2.to(**to), weights.to(device), ids.to(device)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("routing", ["random", "one-expert", "sparse"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_matches_reference(
    device: str, dtype: torch.dtype, routing: str, shape: tuple[int, int, int, int, int]
) -> None:
    skip_without(device)
    from kernels.triton.fused_moe import fused_moe

    seed = zlib.crc32(repr((routing, shape)).encode())  # fresh inputs for every case, reproducible
    x, w13, w2, weights, ids = _inputs(shape, device, dtype, routing, seed)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = reference.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) < 4 * tol_for(dtype), (routing, shape, seed)


def test_align_pads_every_expert_to_a_block() -> None:
    from kernels.triton.fused_moe import align_by_expert

    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])  # 6 pairs; expert 2 empty
    sorted_ids, block_expert = align_by_expert(ids, num_experts=4, block_m=4)
    pairs = ids.numel()
    blocks = sorted_ids.view(-1, 4).tolist()
    used = [(e, b) for e, b in zip(block_expert.tolist(), blocks, strict=True) if e >= 0]
    assert [e for e, _ in used] == [0, 1, 3]  # one block each, in expert order; no block for expert 2
    for expert, block in used:
        real = [p for p in block if p < pairs]
        assert real and all(ids.flatten()[p] == expert for p in real)
    assert sorted(p for _, b in used for p in b if p < pairs) == list(range(pairs))
    assert all(e == -1 for e in block_expert.tolist()[len(used) :])
