"""The quantized-weight GEMM (kernels/triton/quant_gemm.py) against its reference twin, and the twin
against its definition. On the CPU the Triton kernel runs on the interpreter (conftest) in fp32 and
fp16; the `gpu` cases run it on CUDA in bf16."""

from __future__ import annotations

import pytest
import torch

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _quantized(n: int, k: int, bits: int, group_size: int, asym: bool, gen: torch.Generator):
    groups = k // group_size
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        packed = q
    else:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (n, groups), generator=gen).float() if asym else None
    return q, packed, scales, zeros


def test_reference_dequantize_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    q, packed, scales, zeros = _quantized(5, 64, 4, 32, True, gen)
    assert zeros is not None
    w = reference.dequantize_weight(packed, scales, 4, zeros)
    expected = (q.float() - zeros.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
    torch.testing.assert_close(w, expected)
    q8, packed8, s8, _ = _quantized(3, 64, 8, 64, False, gen)
    torch.testing.assert_close(reference.dequantize_weight(packed8, s8, 8), q8.float() * s8)


CASES = [
    # (M, N, K, bits, group_size, asym, bias)
    (1, 67, 128, 8, 128, False, False),
    (7, 67, 128, 8, 32, False, True),
    (16, 33, 128, 4, 64, False, False),
    (300, 67, 128, 4, 128, True, True),
    (1, 45, 256, 4, 32, True, False),
    (300, 19, 128, 8, 64, False, False),
    (5, 33, 96, 4, 48, True, False),  # a K tile spans two groups: per-element scales
    (3, 21, 100, 8, 100, False, True),  # K not a multiple of the tile
]


@pytest.mark.parametrize(("m", "n", "k", "bits", "group_size", "asym", "with_bias"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_gemm_matches_reference(
    m: int, n: int, k: int, bits: int, group_size: int, asym: bool, with_bias: bool, dtype: torch.dtype
) -> None:
    from kernels.triton.quant_gemm import quant_linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(m * 1000 + n)
    _, packed, scales, zeros = _quantized(n, k, bits, group_size, asym, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    expected = reference.quant_linear(x, packed, scales, bits, zeros, bias)
    args = [t.to(device) if t is not None else None for t in (x, packed, scales, zeros, bias)]
    out = quant_linear(args[0], args[1], args[2], bits, args[3], args[4]).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k", "bits", "group_size", "asym", "with_bias"), CASES)
def test_quant_gemm_bf16_gpu(
    m: int, n: int, k: int, bits: int, group_size: int, asym: bool, with_bias: bool
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kernels.triton.quant_gemm import quant_linear

    gen = torch.Generator().manual_seed(m + n)
    _, packed, scales, zeros = _quantized(n, k * 8, bits, group_size, asym, gen)
    x = torch.randn(m, k * 8, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    # The kernel's contract rounds each dequantized weight to the activation dtype before the
    # tensor-core dot; in bf16 (8 significant bits) that rounding alone moves an int8 output (weights
    # ten times larger than int4's here) by more than an absolute tolerance meant for the result's
    # own rounding. So the twin is the reference with its weight rounded the same way.
    w = reference.dequantize_weight(packed, scales, bits, zeros).to(torch.bfloat16).float()
    expected = x.float() @ w.t() + (bias.float() if bias is not None else 0.0)
    args = [t.cuda() if t is not None else None for t in (x, packed, scales, zeros, bias)]
    out = quant_linear(args[0], args[1], args[2], bits, args[3], args[4]).cpu()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    # and within bf16's weight rounding of the exact fp32 twin, scaled to the output's magnitude
    exact = reference.quant_linear(
        x.float(), packed, scales, bits, zeros, bias.float() if bias is not None else None
    )
    assert (out.float() - exact).norm() / exact.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 300])
def test_fp8_scaled_mm_w8a8_gpu(m: int) -> None:
    """W8A8 through torch._scaled_mm (dynamic per-token activation scales) against the weight-only
    FP8 twin: the activations' e4m3 rounding (1/16 relative) is the difference."""
    from services.worker.layers.quantization.fp8 import device_has_fp8, quantize_fp8, scaled_mm_fp8

    if not torch.cuda.is_available() or not device_has_fp8(torch.device("cuda")):
        pytest.skip("needs a GPU with FP8 (compute capability >= 8.9)")
    gen = torch.Generator().manual_seed(m)
    w, s = quantize_fp8(torch.randn(4096, 1024, generator=gen) * 0.02)
    x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16)
    bias = torch.randn(4096, generator=gen).to(torch.bfloat16)
    expected = reference.fp8_linear(x, w, s, bias).float()
    out = scaled_mm_fp8(x.cuda(), w.cuda(), s.cuda(), bias.cuda()).cpu().float()
    assert out.shape == (m, 4096)
    err = (out - expected).norm() / expected.norm()
    assert err < 0.05, err


def test_quant_bench_smoke() -> None:
    """benchmarks/quant_bench.py --smoke runs every format on the CPU and writes its JSON."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quant.json"
        subprocess.run(
            [sys.executable, str(repo / "benchmarks" / "quant_bench.py"), "--smoke", "--out", str(out)],
            check=True,
            cwd=repo,
            timeout=300,
        )
        report = json.loads(out.read_text())
    formats = [r["format"] for r in report["decode"]]
    assert formats == ["bf16", "int8", "fp8", "int4"]
    weights = {r["format"]: r["weight_GB"] for r in report["decode"]}
    assert weights["int4"] < weights["int8"] < weights["bf16"] and weights["fp8"] == weights["int8"]


@pytest.mark.parametrize(("quantization", "group_size"), [("int8", 0), ("int4", 32)])
def test_quantized_model_on_the_triton_gemm(quantization: str, group_size: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A quantized model whose Linear layers call the Triton GEMM (interpreter on the CPU) gives
    the logits of the same model on the reference twin: the QuantMethod -> KernelOps wiring."""
    import dataclasses

    from test_folded_norm_ops import _model_logits, _tiny_hf

    from kernels import REFERENCE_OPS
    from kernels.triton.quant_gemm import quant_linear
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    hf = _tiny_hf("llama", seed=3)
    hf.save_pretrained(str(tmp_path))
    cfg = load_model_config(str(tmp_path))
    triton_ops = dataclasses.replace(REFERENCE_OPS, quant_linear=quant_linear)
    cpu = torch.device("cpu")
    on_triton = build_model(cfg, triton_ops, cpu, torch.float32, "auto", 0, quantization, group_size)
    on_reference = build_model(cfg, REFERENCE_OPS, cpu, torch.float32, "auto", 0, quantization, group_size)
    prompt = [1, 17, 99, 5, 64, 3, 120, 42]
    torch.testing.assert_close(
        _model_logits(on_triton, prompt), _model_logits(on_reference, prompt), atol=1e-4, rtol=1e-4
    )
