"""The folded-RMSNorm ops (kernels/__init__.py): the reference twins against their definitions and
the algebra the folding relies on, and the Triton kernels against the reference.

On the CPU the Triton kernels run on the interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and
fp16; the `gpu` cases run them on CUDA in bf16.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import CASES, CPU_CASES, GPU_CASES, UNFOLDED_OPS, skip_without, tol_for

from kernels import REFERENCE_OPS, reference
from tests.worker.worker_testlib import model_logits as _model_logits
from tests.worker.worker_testlib import tiny_folding_model

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-5


def _inv_rms64(x: torch.Tensor, eps: float) -> torch.Tensor:  # [T, H] -> [T, 1] float64
    xd = x.double()
    return torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def _close_to_rounded(out: torch.Tensor, exact: torch.Tensor) -> None:
    """out (low precision) is `exact` (float64) rounded once, up to a couple of ulps of fp32 math."""
    assert out.dtype != torch.float64
    expected = exact.to(out.dtype)
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out.dtype]
    torch.testing.assert_close(out.double(), expected.double(), atol=tol, rtol=tol)


def _rand(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# --- reference twins against their definitions --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_linear_rms_norm(dtype: torch.dtype, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _rand(5, 48, dtype=dtype, gen=gen, scale=3.0)
    w = _rand(40, 48, dtype=dtype, gen=gen, scale=0.1)
    b = _rand(40, dtype=dtype, gen=gen) if with_bias else None
    out = reference.linear_rms_norm(x, w, b, EPS)
    assert out.shape == (5, 40) and out.dtype == dtype
    _close_to_rounded(out, F.linear(x.double() * _inv_rms64(x, EPS), w.double(), _d(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_linear_add(dtype: torch.dtype, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = _rand(3, 32, dtype=dtype, gen=gen)
    w = _rand(24, 32, dtype=dtype, gen=gen, scale=0.1)
    b = _rand(24, dtype=dtype, gen=gen) if with_bias else None
    residual = _rand(3, 24, dtype=dtype, gen=gen, scale=4.0)
    before = residual.clone()
    out = reference.linear_add(x, w, b, residual)
    assert torch.equal(residual, before), "linear_add must not write its residual"
    assert out.shape == (3, 24) and out.dtype == dtype
    _close_to_rounded(out, residual.double() + F.linear(x.double(), w.double(), _d(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_silu_and_mul_rms(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    gate_up = _rand(4, 2 * 36, dtype=dtype, gen=gen, scale=5.0)
    x = _rand(4, 20, dtype=dtype, gen=gen, scale=2.0)
    out = reference.silu_and_mul_rms(gate_up, x, EPS)
    assert out.shape == (4, 36) and out.dtype == dtype
    s = _inv_rms64(x, EPS)
    gate, up = gate_up.double()[:, :36] * s, gate_up.double()[:, 36:] * s
    _close_to_rounded(out, F.silu(gate) * up)


def test_folding_is_exact_algebra() -> None:
    """A layer computed with the norm weights folded into the projections equals the unfolded one:
    W (g * n) = (W * g[None, :]) n, for the qkv projection (bias after the scale) and gate/up."""
    gen = torch.Generator().manual_seed(3)
    hidden, inter = 32, 48
    h = torch.randn(6, hidden, generator=gen, dtype=torch.float64) * 3
    g1 = torch.rand(hidden, generator=gen, dtype=torch.float64) + 0.5
    g2 = torch.rand(hidden, generator=gen, dtype=torch.float64) + 0.5
    w_qkv = torch.randn(40, hidden, generator=gen, dtype=torch.float64)
    b_qkv = torch.randn(40, generator=gen, dtype=torch.float64)
    w_gu = torch.randn(2 * inter, hidden, generator=gen, dtype=torch.float64)
    unfolded_qkv = F.linear(reference.rms_norm(h, g1, EPS), w_qkv, b_qkv)
    folded_qkv = reference.linear_rms_norm(h, w_qkv * g1[None, :], b_qkv, EPS)
    # (the reference ops compute in fp32 whatever the input dtype, hence fp32 tolerances)
    torch.testing.assert_close(folded_qkv.double(), unfolded_qkv, atol=1e-5, rtol=1e-5)
    unfolded_act = reference.silu_and_mul(F.linear(reference.rms_norm(h, g2, EPS), w_gu))
    folded_act = reference.silu_and_mul_rms(F.linear(h, w_gu * g2[None, :]), h, EPS)
    torch.testing.assert_close(folded_act.double(), unfolded_act, atol=1e-5, rtol=1e-5)


def test_reference_bundle_folds_norms() -> None:
    assert REFERENCE_OPS.folds_norms
    assert REFERENCE_OPS.silu_and_mul_rms is reference.silu_and_mul_rms


# --- the Triton SiLU-and-mul with the folded norm's 1/rms ---------------------------------------


@pytest.fixture(scope="module")
def triton_silu():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    # The module (kernels.triton re-exports its `silu_and_mul` function under the same name).
    return importlib.import_module("kernels.triton.silu_and_mul")


# (T, H, I): I non-power-of-two and above one 1024 block; H above one 4096-element chunk (loop + mask)
SILU_SHAPES = [(1, 64, 96), (3, 200, 1500), (8, 5000, 300), (20, 48, 1024)]


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("num_tokens", "hidden", "inter"), SILU_SHAPES)
def test_triton_silu_and_mul_rms(  # type: ignore[no-untyped-def]
    triton_silu, device: str, dtype: torch.dtype, num_tokens: int, hidden: int, inter: int
) -> None:
    skip_without(device)
    gen = torch.Generator().manual_seed(num_tokens * 7 + hidden)
    gate_up = (torch.randn(num_tokens, 2 * inter, generator=gen) * 4).to(device=device, dtype=dtype)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(device=device, dtype=dtype)
    out = triton_silu.silu_and_mul_rms(gate_up, x, EPS)
    expected = reference.silu_and_mul_rms(gate_up, x, EPS)
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    tol = tol_for(dtype)
    torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol)
    # The plain variant (RMS off) of the same kernel is unchanged.
    torch.testing.assert_close(
        triton_silu.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=tol * 4, rtol=tol
    )


@pytest.mark.parametrize(("device", "dtype"), CPU_CASES[:1] + GPU_CASES)
def test_triton_silu_and_mul_rms_empty_and_strided(triton_silu, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    empty = triton_silu.silu_and_mul_rms(
        torch.empty(0, 64, device=device, dtype=dtype), torch.empty(0, 16, device=device, dtype=dtype), EPS
    )
    assert empty.shape == (0, 32)
    # Rows of a wider buffer (row stride != width), as a slice of a larger activation would be.
    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(3, 2 * 40 + 8, generator=gen).to(device=device, dtype=dtype)[:, : 2 * 40]
    x = torch.randn(3, 24 + 5, generator=gen).to(device=device, dtype=dtype)[:, :24]
    tol = tol_for(dtype)
    torch.testing.assert_close(
        triton_silu.silu_and_mul_rms(gate_up, x, EPS),
        reference.silu_and_mul_rms(gate_up, x, EPS),
        atol=tol * 4,
        rtol=tol,
    )


# --- the skinny GEMM's RMS-norm and residual epilogues (kernels/triton/skinny_gemm.py) ----------


@pytest.fixture(scope="module")
def skinny():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    return importlib.import_module("kernels.triton.skinny_gemm")


GEMM_ROWS = [1, 3, 8, 20]  # above 8 rows (MAX_ROWS) only the cuBLAS fallback applies
GEMM_K, GEMM_N = 96, 80  # K over two 64-wide tiles and N over three 32-wide blocks, both masked


def _gemm_inputs(
    num_tokens: int, with_bias: bool, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(num_tokens * 2 + with_bias)

    def make(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = make(num_tokens, GEMM_K, scale=3.0)  # residual-stream-like: not normalised
    w = make(GEMM_N, GEMM_K, scale=0.1)
    b = make(GEMM_N, scale=0.5) if with_bias else None
    residual = make(num_tokens, GEMM_N, scale=2.0)
    return x, w, b, residual


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_tokens", GEMM_ROWS)
def test_skinny_linear_rms_norm(  # type: ignore[no-untyped-def]
    skinny, device: str, dtype: torch.dtype, with_bias: bool, num_tokens: int
) -> None:
    skip_without(device)
    x, w, b, _ = _gemm_inputs(num_tokens, with_bias, device, dtype)
    expected = reference.linear_rms_norm(x, w, b, EPS)
    tol = tol_for(dtype)
    # The bundle's op (on the CPU, and untuned on CUDA: the norm kernel, then F.linear).
    torch.testing.assert_close(skinny.linear_rms_norm(x, w, b, EPS), expected, atol=tol * 4, rtol=tol * 2)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_tokens", GEMM_ROWS)
def test_skinny_linear_add(  # type: ignore[no-untyped-def]
    skinny, device: str, dtype: torch.dtype, with_bias: bool, num_tokens: int
) -> None:
    skip_without(device)
    x, w, b, residual = _gemm_inputs(num_tokens, with_bias, device, dtype)
    before = residual.clone()
    expected = reference.linear_add(x, w, b, residual)
    tol = tol_for(dtype)
    torch.testing.assert_close(skinny.linear_add(x, w, b, residual), expected, atol=tol * 4, rtol=tol * 2)
    if num_tokens <= skinny.MAX_ROWS:
        out = skinny.skinny_gemm(x, w, b, skinny.SkinnyConfig(32, 64, 4, 2), residual=residual)
        torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol)
    assert torch.equal(residual, before), "linear_add must not write its residual"


def test_reference_linear_silu_and_mul_is_the_composition() -> None:
    """The twin equals silu_and_mul(_rms) of the projection, up to the one rounding it skips (fp32)."""
    gen = torch.Generator().manual_seed(11)
    x, w, b = (
        _rand(3, 40, dtype=torch.float32, gen=gen, scale=3.0),
        _rand(48, 40, dtype=torch.float32, gen=gen),
        None,
    )
    gate_up = F.linear(x, w, b)
    torch.testing.assert_close(reference.linear_silu_and_mul(x, w, b), reference.silu_and_mul(gate_up))
    torch.testing.assert_close(
        reference.linear_silu_and_mul(x, w, b, EPS), reference.silu_and_mul_rms(gate_up, x, EPS)
    )


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_tokens", GEMM_ROWS)
def test_skinny_linear_silu_and_mul(  # type: ignore[no-untyped-def]
    skinny, device: str, dtype: torch.dtype, with_bias: bool, num_tokens: int
) -> None:
    """The SiLU-and-mul epilogue (gate and up rows of each output block from the two halves of W;
    I = 40 leaves the last block partial) against the twin, with and without the folded norm's
    scale (one row only), and the bundle op (untuned: GEMM then the SiLU kernel)."""
    skip_without(device)
    x, w, b, _ = _gemm_inputs(num_tokens, with_bias, device, dtype)  # w: [80, K] = [gate; up], I = 40
    tol = tol_for(dtype)
    for rms_eps in (None, EPS):
        expected = reference.linear_silu_and_mul(x, w, b, rms_eps)
        assert expected.shape == (num_tokens, GEMM_N // 2)
        got = skinny.linear_silu_and_mul(x, w, b, rms_eps)
        torch.testing.assert_close(got, expected, atol=tol * 8, rtol=tol * 4)
        if num_tokens <= skinny.MAX_ROWS and (rms_eps is None or num_tokens == 1):
            for config in (skinny.SkinnyConfig(32, 64, 4, 2), skinny.SkinnyConfig(16, 64, 4, 2)):
                out = skinny.skinny_gemm(x, w, b, config, gated=True, rms_eps=rms_eps)
                torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol * 2)


# --- a whole folded model on the Triton bundle ----------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_triton_bundle_folds_a_model(triton_silu, family: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The Triton bundle folds the norms (on the CPU its linear ops take their fallbacks; the SiLU
    kernel runs on the interpreter) and gives the unfolded reference model's logits. (Qwen3-MoE's
    fold is off by default, models/qwen3_moe.py: turned on here to check the folded path.)"""
    from kernels.triton import TRITON_OPS
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config
    from services.worker.models.qwen3_moe import Qwen3MoeForCausalLM

    monkeypatch.setattr(Qwen3MoeForCausalLM, "folds_with_qk_norm", True)

    hf = tiny_folding_model(family, seed=7)
    hf.save_pretrained(str(tmp_path))
    cfg = load_model_config(str(tmp_path))
    folded = build_model(cfg, TRITON_OPS, torch.device("cpu"), torch.float32, "auto")
    unfolded = build_model(cfg, UNFOLDED_OPS, torch.device("cpu"), torch.float32, "auto")
    assert TRITON_OPS.folds_norms and folded.norms_folded and not unfolded.norms_folded
    prompt = [1, 17, 99, 5, 64, 3, 120, 42, 8, 77]
    got = _model_logits(folded, prompt)
    torch.testing.assert_close(got, _model_logits(unfolded, prompt), atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(got, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)
