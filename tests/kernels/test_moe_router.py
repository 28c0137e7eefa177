"""The MoE router in the routing kernel (kernels/triton/moe_route.moe_router: the router GEMV, split
over expert tiles and K, then the top-k in the last program to arrive) against its reference twin
(reference.moe_router: F.linear, then moe_route): Mixtral's 8 experts top-2, gpt-oss's biased 32
top-4 (softmax of the top k), Qwen3-MoE's 128 top-8 (norm_topk_prob), the folded norm's 1/rms,
skewed and sparse routings; on the interpreter in fp32/fp16, in bf16 and a CUDA graph on the GPU."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import rel_err, tol_for

from kernels import reference

# (tokens, hidden, experts, top_k, scoring, renormalize, bias, folded norm)
CASES = [
    (1, 64, 8, 2, "softmax_topk", False, False, False),  # Mixtral, one K split
    (5, 300, 8, 1, "softmax_topk", False, False, True),  # K splits with a tail
    (3, 200, 32, 4, "topk_softmax", False, True, False),  # gpt-oss: biased router
    (8, 96, 60, 4, "softmax_topk", True, False, True),  # E not a power of two, expert-tile tail
    (2, 512, 128, 8, "softmax_topk", True, False, True),  # Qwen3-MoE, scaled down
    (16, 64, 16, 8, "topk_softmax", False, True, False),  # ROUTER_MAX_TOKENS
]


def _inputs(
    case: tuple, dtype: torch.dtype, routing: str = "random", device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    tokens, hidden, experts, _, _, _, bias, folded = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, routing)).encode()))
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(experts, hidden, generator=gen) / hidden**0.5
    b = torch.randn(experts, generator=gen) if bias else None
    if routing == "one-expert":  # every token's logit of expert 0 far above the rest
        x[:, 0] = x[:, 0].abs() + 8.0
        w[0, 0] = 4.0
    elif routing == "sparse":  # experts 1..E-2 far below: only the first and last are chosen
        x[:, 0] = x[:, 0].abs() + 8.0
        w[1:-1, 0] = -4.0
    if folded:  # the raw residual stream: rows of very different scale (the 1/rms matters)
        x = x * torch.linspace(0.3, 40.0, tokens)[:, None]
    to = {"device": device, "dtype": dtype}
    return x.to(**to), w.to(**to), b.to(**to) if b is not None else None


def _check(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], top_k: int
) -> None:
    """Same experts in the same order and the same weights, except for a token whose k-th and
    (k+1)-th choices are within rounding of each other (then the sets may differ in that one)."""
    weights, ids = got
    want_w, want_ids = want
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == want_ids.shape
    assert int(ids.min()) >= 0
    same = (ids == want_ids).all(dim=-1)
    assert same.float().mean() >= 0.75, (ids, want_ids)
    torch.testing.assert_close(weights[same], want_w[same], rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-H{c[1]}-E{c[2]}-k{c[3]}")
def test_moe_router_matches_reference(dtype: torch.dtype, case: tuple) -> None:
    from kernels.triton.arrival_counters import _BUFFERS
    from kernels.triton.moe_route import moe_router

    tokens, _, _, top_k, scoring, renormalize, _, folded = case
    x, w, b = _inputs(case, dtype)
    eps = 1e-6 if folded else None
    got = moe_router(x, w, b, top_k, scoring, renormalize, eps)
    want = reference.moe_router(x, w, b, top_k, scoring, renormalize, eps)
    if dtype == torch.float32:  # no rounding ties: exactly the reference's experts
        assert torch.equal(got[1], want[1]), (got[1], want[1])
    _check(got, want, top_k)
    assert int(_BUFFERS["moe_router", x.device][0]) == 0  # the last program reset the arrival counter
    if renormalize or scoring == "topk_softmax":
        torch.testing.assert_close(got[0].sum(-1), torch.ones(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["one-expert", "sparse"])
@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=["gpt-oss", "qwen3-moe"])
def test_moe_router_skewed_routings(routing: str, case: tuple) -> None:
    """Every token to expert 0 (its first choice), or only the first and last experts chosen."""
    from kernels.triton.moe_route import moe_router

    _, _, experts, top_k, scoring, renormalize, _, folded = case
    x, w, b = _inputs(case, torch.float32, routing)
    eps = 1e-6 if folded else None
    got = moe_router(x, w, b, top_k, scoring, renormalize, eps)
    want = reference.moe_router(x, w, b, top_k, scoring, renormalize, eps)
    assert torch.equal(got[1], want[1])
    _check(got, want, top_k)
    if routing == "one-expert":
        assert bool((got[1][:, 0] == 0).all())
    else:
        assert set(got[1][:, :2].flatten().tolist()) <= {0, experts - 1}


def test_moe_router_applies_the_folded_norms_rms() -> None:
    """With rms_eps the router read the raw stream h: its experts and weights are those of the
    normalised input's logits (softmax is not scale-invariant: without the scale they differ)."""
    from kernels.triton.moe_route import moe_router

    case = CASES[4]
    h, w, _ = _inputs(case, torch.float32)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = reference.moe_route(normed @ w.t(), 8, "softmax_topk", True)
    got = moe_router(h, w, None, 8, "softmax_topk", True, 1e-6)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    unscaled = moe_router(h, w, None, 8, "softmax_topk", True)
    assert (unscaled[0] - want[0]).abs().max() > 1e-2


def test_moe_router_of_many_tokens_and_of_none() -> None:
    """Past ROUTER_MAX_TOKENS (prefill) the logits come from F.linear, then the routing kernel;
    zero tokens give empty results; an unknown scoring is a clear error."""
    from kernels.triton.moe_route import ROUTER_MAX_TOKENS, moe_router

    case = (ROUTER_MAX_TOKENS + 3, 64, 8, 2, "softmax_topk", True, False, True)
    x, w, _ = _inputs(case, torch.float32)
    got = moe_router(x, w, None, 2, "softmax_topk", True, 1e-6)
    want = reference.moe_router(x, w, None, 2, "softmax_topk", True, 1e-6)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    weights, ids = moe_router(x[:0], w, None, 2)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)
    with pytest.raises(ValueError, match="unknown MoE scoring 'sigmoid'"):
        moe_router(x, w, None, 2, "sigmoid")


def test_moe_router_of_a_nan_row_names_real_experts() -> None:
    """A diverged token (NaN in x) still gets real expert ids; the other tokens are unaffected."""
    from kernels.triton.moe_route import moe_router

    case = CASES[2]
    x, w, b = _inputs(case, torch.float32)
    x[1, 3] = float("nan")
    weights, ids = moe_router(x, w, b, 4, "topk_softmax")
    assert int(ids.min()) >= 0 and int(ids.max()) < 32, ids
    want_w, want_ids = reference.moe_router(x, w, b, 4, "topk_softmax")
    assert torch.equal(ids[[0, 2]], want_ids[[0, 2]])
    torch.testing.assert_close(weights[[0, 2]], want_w[[0, 2]])


def test_router_grid_reads_the_weight_in_about_one_wave() -> None:
    """The served shapes' grids: every split non-empty, K tiles whole, about one wave of programs."""
    from kernels.triton.moe_route import ROUTER_BLOCK_K, router_grid

    for experts, hidden in [(128, 2048), (32, 2880), (8, 4096), (128, 4096), (64, 5120), (8, 64)]:
        grid = router_grid(experts, hidden)
        assert grid.k_per_split % ROUTER_BLOCK_K == 0
        assert (grid.splits - 1) * grid.k_per_split < hidden <= grid.splits * grid.k_per_split
        assert grid.expert_tiles * grid.splits <= 160, (experts, hidden, grid)
    assert router_grid(128, 2048).expert_tiles * router_grid(128, 2048).splits == 128


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 8])
@pytest.mark.parametrize(
    "shape",
    [
        (2048, 128, 8, "softmax_topk", True, False),
        (2880, 32, 4, "topk_softmax", False, True),
        (4096, 8, 2, "softmax_topk", False, False),
    ],
    ids=["qwen3-30b-a3b-folded", "gpt-oss-20b", "mixtral"],
)
def test_moe_router_bf16_in_a_cuda_graph_is_one_kernel(tokens: int, shape: tuple) -> None:
    """bf16 at the served shapes, captured and replayed three times (the counter resets itself):
    the reference's routing where no near-tie separates them, and one kernel, no router GEMM."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.triton.moe_route import moe_router

    hidden, experts, top_k, scoring, renormalize, bias = shape
    folded = scoring == "softmax_topk" and renormalize
    case = (tokens, hidden, experts, top_k, scoring, renormalize, bias, folded)
    x, w, b = _inputs(case, torch.bfloat16, device="cuda")
    eps = 1e-6 if folded else None
    moe_router(x, w, b, top_k, scoring, renormalize, eps)  # compile and the counter outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = moe_router(x, w, b, top_k, scoring, renormalize, eps)
    want = reference.moe_router(x, w, b, top_k, scoring, renormalize, eps)
    for _ in range(3):
        got[0].zero_()
        graph.replay()
        torch.cuda.synchronize()
        _check(got, want, top_k)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == ["_moe_router_kernel"], kernels


@pytest.mark.gpu
def test_moe_router_logits_within_bf16_of_fp32() -> None:
    """The in-kernel GEMV's logits, through the routing weights of a one-expert routing (k = 1 of
    a softmax over all E: the weight is the softmax's max, a function of every logit)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.triton.moe_route import moe_router

    case = (8, 2048, 128, 1, "softmax_topk", False, False, False)
    x, w, _ = _inputs(case, torch.bfloat16, device="cuda")
    got_w, got_ids = moe_router(x, w, None, 1, "softmax_topk", False)
    want_w, want_ids = reference.moe_router(x.double(), w.double(), None, 1, "softmax_topk", False)
    same = (got_ids == want_ids).all(-1)
    assert rel_err(got_w[same], want_w[same]) < 4 * tol_for(torch.bfloat16)


def test_router_kernel_compiles_for_sm90() -> None:
    """The router kernel compiles for an H100 (sm_90) on the CPU, its weight stream as 16-byte
    async copies, no 2-byte loads but the bias's (as fused_moe's decode kernels), with the PDL
    wait and signal; in a subprocess without the interpreter."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import test_moe_router as t; t.check_router_ptx()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def check_router_ptx() -> None:
    import importlib

    from test_fused_moe import _sm90_ptx

    mr = importlib.import_module("kernels.triton.moe_route")
    for folded, bias in ((True, False), (False, True)):
        ptx = _sm90_ptx(
            mr._moe_router_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "part_ptr": "*fp32", "sq_ptr": "*fp32"}
            | {"counter_ptr": "*i32", "weights_ptr": "*fp32", "ids_ptr": "*i64", "num_tokens": "i32"}
            | {"num_experts": "i32", "hidden": "i32", "stride_xt": "i32", "stride_we": "i32"}
            | {"k_per_split": "i32", "rms_eps": "fp32"},
            {
                "HAS_BIAS": bias,
                "HAS_RMS": folded,
                "TOP_K": 8,
                "SOFTMAX_FIRST": True,
                "RENORMALIZE": True,
                "BLOCK_T": mr.ROUTER_MAX_TOKENS,
                "TILE_E": mr.ROUTER_TILE_E,
                "BLOCK_K": mr.ROUTER_BLOCK_K,
                "BLOCK_E": 128,
                "BLOCK_S": 16,
                "BLOCK_TOPK": 8,
                "PDL": True,
            },
            num_warps=4,
        )
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
        assert "atom.global" in ptx, "the arrival counter"
        assert "cp.async.cg.shared.global" in ptx, "the weight as pipelined 16-byte async copies"
        # (the one 2-byte load: the bias of the last program's experts)
        assert ptx.count("ld.global.b16") + ptx.count("ld.global.nc.b16") == int(bias), "2-byte loads"
