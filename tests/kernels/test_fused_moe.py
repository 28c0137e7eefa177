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


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("routing", ["random", "one-expert"])
def test_fused_moe_with_biases_and_clamped_swiglu(device: str, dtype: torch.dtype, routing: str) -> None:
    """gpt-oss's experts: biases on both projections and the clamped SwiGLU; the gate/up values
    are scaled past the clamp limit so that the clamps matter."""
    skip_without(device)
    from kernels.triton.fused_moe import fused_moe

    shape = (7, 64, 48, 8, 4)
    x, w13, w2, weights, ids = _inputs(shape, device, dtype, routing, seed=77)
    gen = torch.Generator().manual_seed(78)
    w13 = w13 * 12.0  # |gate/up| well above the limit of 7 for many rows
    b13 = (torch.randn(8, 96, generator=gen)).to(device=device, dtype=dtype)
    b2 = (torch.randn(8, 64, generator=gen) * 0.1).to(device=device, dtype=dtype)
    h = x.double() @ w13[0].double().t()
    assert (h.abs() > reference.SWIGLU_LIMIT).float().mean() > 0.1
    out = fused_moe(x, w13, w2, weights, ids, b13, b2, activation="swiglu_oai")
    ref = reference.fused_moe(
        x.double(), w13.double(), w2.double(), weights.double(), ids, b13.double(), b2.double(), "swiglu_oai"
    )
    plain = reference.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert rel_err(plain, ref) > 0.1
    assert rel_err(out, ref) < 4 * tol_for(dtype), routing


def test_swiglu_oai_matches_transformers() -> None:
    """reference.swiglu_oai on [gate; up] halves = GptOssExperts._apply_gate on interleaved ones."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=2))
    gen = torch.Generator().manual_seed(1)
    interleaved = torch.randn(5, 12, generator=gen) * 6.0
    halves = torch.cat((interleaved[:, ::2], interleaved[:, 1::2]), dim=-1)
    torch.testing.assert_close(reference.swiglu_oai(halves), experts._apply_gate(interleaved), rtol=0, atol=0)


@pytest.mark.gpu
def test_fused_moe_replays_in_a_cuda_graph() -> None:
    """A decode step's MoE is captured in the step's CUDA graph: the expert alignment must not read
    anything back to the host (CUDA's bincount did, and capture failed), and a replay with another
    routing written into the same input buffers gives that routing's output."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.triton.fused_moe import fused_moe

    shape = (8, 64, 48, 8, 4)
    x, w13, w2, weights, ids = _inputs(shape, "cuda", torch.bfloat16, "random", seed=5)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for routing, seed in (("one-expert", 6), ("sparse", 7)):
        x2, _, _, weights2, ids2 = _inputs(shape, "cuda", torch.bfloat16, routing, seed)
        x.copy_(x2)
        weights.copy_(weights2)
        ids.copy_(ids2)
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_moe(x, w13, w2, weights, ids)
        assert torch.equal(out, eager), routing
