"""The quantized-weight GEMM (kernels/triton/quant_gemm.py) against its reference twin, and the twin
against its definition. On the CPU the Triton kernel runs on the interpreter (conftest) in fp32 and
fp16; the `gpu` cases run it on CUDA in bf16."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from kernel_cases import fp8_weight_codes, quantized_weight, triton_quant_ops

from kernels import reference
from tests.bench_testlib import run_bench

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def test_reference_dequantize_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    q, packed, scales, zeros = quantized_weight(5, 64, 4, 32, True, gen)
    assert zeros is not None
    w = reference.dequantize_weight(packed, scales, 4, zeros)
    expected = (q.float() - zeros.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
    torch.testing.assert_close(w, expected)
    q8, packed8, s8, _ = quantized_weight(3, 64, 8, 64, False, gen)
    torch.testing.assert_close(reference.dequantize_weight(packed8, s8, 8), q8.float() * s8)


CASES = [
    # (M, N, K, bits, group_size, asym, bias)
    (1, 67, 128, 8, 128, False, False),
    (7, 67, 128, 8, 32, False, True),
    (16, 33, 128, 4, 64, False, False),
    (300, 67, 128, 4, 128, True, True),
    (1, 45, 256, 4, 32, True, False),
    (300, 19, 128, 8, 64, False, False),
    (5, 33, 96, 4, 48, True, False),  # groups of 48 (no power-of-two tile of >= 32 fits): per-element scales
    (4, 24, 256, 8, 32, True, False),  # groups of 32: K tiles of 32
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
    _, packed, scales, zeros = quantized_weight(n, k, bits, group_size, asym, gen)
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
    _, packed, scales, zeros = quantized_weight(n, k * 8, bits, group_size, asym, gen)
    x = torch.randn(m, k * 8, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    # Where the scale meets the fp32 sums (per channel, or a group holding whole K tiles) the codes
    # enter the dot exact; otherwise each dequantized weight is rounded to bf16 first. Either way
    # the result is within bf16's rounding of the exact fp32 twin, scaled to the output's magnitude.
    args = [t.cuda() if t is not None else None for t in (x, packed, scales, zeros, bias)]
    out = quant_linear(args[0], args[1], args[2], bits, args[3], args[4]).cpu()
    exact = reference.quant_linear(
        x.float(), packed, scales, bits, zeros, bias.float() if bias is not None else None
    )
    err = (out.float() - exact).abs().max() / exact.abs().max()
    assert err < 1e-2, err
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
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quant.json"
        report, _ = run_bench("quant_bench.py", "--smoke", out=out)
    formats = [r["format"] for r in report["decode"]]
    assert formats == ["bf16", "int8", "fp8", "int4"]
    weights = {r["format"]: r["weight_GB"] for r in report["decode"]}
    assert weights["int4"] < weights["int8"] < weights["bf16"] and weights["fp8"] == weights["int8"]
    # every fp8 GEMM row says which path runs (on the CPU: weight-only; on an FP8 GPU the
    # tuner's choice, `_scaled_mm` or a Triton config, with its report lines in fp8_tuning)
    # the decode step's fused gate/up (the folded path) and the launches it replaces, per format
    assert all(r["norms_folded"] for r in report["decode"])
    folded = [g["kernel"] for g in report["gemm"] if g["kernel"].startswith("folded ")]
    for label in ("int8", "int4", "fp8 weight-only"):
        assert f"folded {label}: norm + GEMM + SiLU" in folded, folded
        assert any(name.startswith(f"folded {label}: fused ") for name in folded), folded
    fp8_rows = [g for g in report["gemm"] if g["kernel"].startswith("fp8")]
    assert fp8_rows and all(g["fp8_choice"] == "weight-only" for g in fp8_rows)
    assert report["fp8_tuning"] == []


@pytest.mark.parametrize(("quantization", "group_size"), [("int8", 0), ("int4", 32)])
def test_quantized_model_on_the_triton_gemm(quantization: str, group_size: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A quantized model whose Linear layers call the Triton GEMM (interpreter on the CPU) gives
    the logits of the same model on the reference twin: the QuantMethod -> KernelOps wiring."""
    from kernels import REFERENCE_OPS
    from services.worker.loader import build_model
    from tests.worker.worker_testlib import model_logits, saved_config, tiny_folding_model

    cfg = saved_config(tiny_folding_model("llama", seed=3), tmp_path)
    # (the decode step runs the folded path: tests/kernels/test_quant_fused.py)
    triton_ops = triton_quant_ops()
    cpu = torch.device("cpu")
    on_triton = build_model(cfg, triton_ops, cpu, torch.float32, "auto", 0, quantization, group_size)
    on_reference = build_model(cfg, REFERENCE_OPS, cpu, torch.float32, "auto", 0, quantization, group_size)
    prompt = [1, 17, 99, 5, 64, 3, 120, 42]
    torch.testing.assert_close(
        model_logits(on_triton, prompt), model_logits(on_reference, prompt), atol=1e-4, rtol=1e-4
    )


# --- FP8 W8A8: the Triton FP8 GEMM (kernels/triton/fp8_gemm.py), its twin and the per-shape choice ---


def _fp8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from services.worker.layers.quantization.fp8 import quantize_fp8

    return quantize_fp8(torch.randn(n, k, generator=gen) * 0.02)


def _exact_rows(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of e4m3 values with a 448 in each, times a power of two: x / scale is exact and needs
    no rounding (the Triton interpreter rounds fp32 -> e4m3 wrongly where the mantissa carries
    into the exponent, which the GPU's conversion does not)."""
    codes = (torch.randn(m, k, generator=gen) * 40).to(torch.float8_e4m3fn).float()
    codes[:, 0] = 448.0
    return codes * 2.0 ** torch.randint(-8, -2, (m, 1), generator=gen).float()


@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (7, 33, 100), (300, 19, 256)])
def test_fp8_w8a8_twin_is_the_dequantized_matmul(m: int, n: int, k: int) -> None:
    """reference.fp8_w8a8_linear = (x's per-token e4m3 codes * scales) @ (W's codes * scales).T + b
    in fp32; its per-token codes are x within e4m3's rounding (1/16 relative), each row's max |x|
    exactly 448, a zero row zero."""
    gen = torch.Generator().manual_seed(m * 7 + n)
    w, s = _fp8_weight(n, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    x[0] = 0.0
    bias = torch.randn(n, generator=gen)
    codes, x_scale = reference.quantize_per_token_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and x_scale.shape == (m, 1)
    assert torch.equal(codes[0].float(), torch.zeros(k))
    if m > 1:
        assert torch.equal(codes[1:].float().abs().amax(dim=1), torch.full((m - 1,), 448.0))
    x_back = codes.float() * x_scale
    assert ((x_back - x).abs() <= x.abs() / 16 + x_scale * 2.0**-9).all()
    expected = (codes.float() * x_scale) @ (w.float() * s).t() + bias
    torch.testing.assert_close(reference.fp8_w8a8_linear(x, w, s, bias), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        reference.fp8_w8a8_linear(x, w, s),
        (codes.float() * x_scale) @ (w.float() * s).t(),
        atol=1e-5,
        rtol=1e-5,
    )
    # and W8A8 differs from weight-only FP8 only by the activations' rounding
    weight_only = reference.fp8_linear(x, w, s, bias)
    assert (reference.fp8_w8a8_linear(x, w, s, bias) - weight_only).norm() / weight_only.norm() < 0.05


def test_fp8_choice_rule() -> None:
    """`choose`: the fastest config within tolerance, only when >= 3% faster than _scaled_mm."""
    from kernels.triton.fp8_gemm import DECODE_CANDIDATES, TOLERANCE, Timed, choose

    a, b, c = DECODE_CANDIDATES[:3]
    assert choose(10.0, []) is None
    assert choose(10.0, [Timed(a, 9.8, 0.0)]) is None  # 2% faster: timing noise, keep _scaled_mm
    assert choose(10.0, [Timed(a, 10.0 / 1.03, 0.0)]) == a  # exactly 3%
    assert choose(10.0, [Timed(a, 9.0, 0.0), Timed(b, 8.0, 0.0), Timed(c, 8.5, 0.0)]) == b
    assert choose(10.0, [Timed(a, 9.0, 0.0), Timed(b, 5.0, TOLERANCE)]) == a  # off: never chosen
    assert choose(10.0, [Timed(a, None, float("inf")), Timed(b, 12.0, 0.0)]) is None  # failed, slower
    assert choose(10.0, [Timed(a, 9.0, float("nan"))]) is None


def test_fp8_row_buckets() -> None:
    from kernels.triton.fp8_gemm import ROW_BUCKETS, _bucket

    assert [_bucket(r) for r in (1, 2, 4, 5, 16, 17, 1000, 1024, 1025, 100000)] == [
        1, 4, 4, 16, 16, 64, 1024, 1024, 4096, 4096,
    ]  # fmt: skip
    assert tuple(sorted(ROW_BUCKETS)) == ROW_BUCKETS


FP8_INTERPRETER_CASES = [
    # (M, N, K, config args (block_m, block_n, block_k, warps, stages, prequant, group_m), bias)
    (1, 67, 96, (16, 32, 64, 4, 1, False, 8), True),
    (7, 33, 200, (16, 64, 64, 4, 1, False, 8), False),
    (16, 50, 128, (16, 16, 32, 4, 1, True, 8), True),
    (40, 50, 100, (16, 16, 32, 4, 1, True, 2), True),  # grouped launch order over 3 x 4 tiles
    (130, 40, 64, (64, 32, 32, 4, 1, True, 8), False),
]


@pytest.mark.parametrize(("m", "n", "k", "cfg", "with_bias"), FP8_INTERPRETER_CASES)
def test_fp8_gemm_matches_twin_interpreter(
    m: int, n: int, k: int, cfg: tuple[int, int, int, int, int, bool, int], with_bias: bool
) -> None:
    """The Triton FP8 GEMM (interpreter on the CPU, fp32 activations) against the twin, on
    activations whose per-token e4m3 codes are exact (_exact_rows): only the summation order
    differs. Also `quantize_per_token` (the prequant kernel) against the twin's codes."""
    if torch.cuda.is_available():
        pytest.skip("the GPU cases below cover it")
    from kernels.triton.fp8_gemm import Fp8Config, fp8_gemm, quantize_per_token

    gen = torch.Generator().manual_seed(m + n + k)
    x = _exact_rows(m, k, gen)
    w, s = _fp8_weight(n, k, gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    expected = reference.fp8_w8a8_linear(x, w, s, bias)
    out = fp8_gemm(x, w, s, bias, Fp8Config(*cfg))
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    codes, scales = quantize_per_token(x)
    ref_codes, ref_scales = reference.quantize_per_token_fp8(x)
    assert torch.equal(codes.float(), ref_codes.float()) and torch.equal(scales, ref_scales)


def _fp8_gpu_or_skip() -> None:
    from services.worker.layers.quantization.fp8 import device_has_fp8

    if not torch.cuda.is_available() or not device_has_fp8(torch.device("cuda")):
        pytest.skip("needs a GPU with FP8 (compute capability >= 8.9)")


# (N, K): model-like, and N / K that are not multiples of any block (N 16-aligned for _scaled_mm)
FP8_GPU_SHAPES = [(1024, 2048), (1008, 1040)]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), FP8_GPU_SHAPES)
def test_fp8_gemm_every_config_bf16_gpu(n: int, k: int) -> None:
    """Every candidate config of the Triton FP8 GEMM against the twin in bf16 at M = 1, 7, 16
    (decode configs) and 128, 1000 (prefill configs), with a bias; one config without. The
    per-token codes are the same (IEEE division in both), so only the fp32 summation order and
    the bf16 rounding of the output differ. `quantize_per_token` gives the twin's codes exactly,
    and `_scaled_mm` (scaled_mm_w8a8) agrees as well."""
    _fp8_gpu_or_skip()
    from kernels.triton.fp8_gemm import candidates, fp8_gemm, quantize_per_token, scaled_mm_w8a8

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w, s = _fp8_weight(n, k, torch.Generator().manual_seed(k))
    w, s = w.cuda(), s.cuda()
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    for m in (1, 7, 16, 128, 1000):
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        expected = reference.fp8_w8a8_linear(x, w, s, bias).float()
        exact = reference.fp8_w8a8_linear(x.float(), w, s, bias.float())  # before the bf16 rounding
        codes, scales = quantize_per_token(x)
        ref_codes, ref_scales = reference.quantize_per_token_fp8(x)
        # (the same IEEE division and round-to-nearest-even; a rare tie rounded through another
        # path would show here as a few codes one step apart, not as a failure of the GEMMs)
        mismatched = (codes.view(torch.uint8) != ref_codes.view(torch.uint8)).float().mean().item()
        assert mismatched < 1e-4, (m, mismatched)
        assert torch.equal(scales, ref_scales), m
        for config in candidates(m):
            out = fp8_gemm(x, w, s, bias, config).float()
            assert out.shape == (m, n)
            torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2, msg=f"{config} M={m}")
            assert (out - exact).norm() / exact.norm() < 5e-3, (config, m)
        scaled = scaled_mm_w8a8(x, w, s, bias).float()
        assert (scaled - exact).norm() / exact.norm() < 5e-3, m
    x = torch.randn(5, k, device="cuda", generator=gen).to(torch.bfloat16)
    out = fp8_gemm(x, w, s, None, candidates(5)[0]).float()
    torch.testing.assert_close(out, reference.fp8_w8a8_linear(x, w, s).float(), atol=2e-2, rtol=1e-2)


def _fp8_twin(choice: object):  # type: ignore[no-untyped-def]
    """The twin of what a tuned FP8 choice computes: W8A8, or weight-only (a QuantConfig)."""
    from kernels.triton.quant_gemm import QuantConfig

    return reference.fp8_linear if isinstance(choice, QuantConfig) else reference.fp8_w8a8_linear


@pytest.mark.gpu
def test_fp8_tuner_and_dispatch_gpu() -> None:
    """`tune_fp8_linear` times _scaled_mm against the configs per row bucket, says what it chose
    in its report, and `w8a8_linear` (what Fp8Method calls) runs that choice within tolerance of
    the twin; a second tuning of the shape keeps the first choice."""
    _fp8_gpu_or_skip()
    from kernels.triton import fp8_gemm as fg

    n, k = 1024, 2048
    weights, scales = [], []
    for seed in range(3):
        w, s = _fp8_weight(n, k, torch.Generator().manual_seed(seed))
        weights.append(w.cuda())
        scales.append(s.cuda())
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    lines = fg.tune_fp8_linear(weights, scales, bias, "test_proj", rows=(1, 16, 1024), reps=5)
    assert len(lines) == 3, lines
    for line, m in zip(lines, (1, 16, 1024), strict=True):
        choice = fg.chosen(n, k, True, m)
        assert line.startswith(f"fp8 test_proj {n}x{k} rows={m}: _scaled_mm "), line
        assert line.endswith(f"-> {choice or '_scaled_mm'}"), line
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        exact = _fp8_twin(choice)(x.float(), weights[0], scales[0], bias.float())
        out = fg.w8a8_linear(x, weights[0], scales[0], bias).float()
        assert (out - exact).norm() / exact.norm() < 5e-3, line
    again = fg.tune_fp8_linear(weights, scales, bias, "test_proj", rows=(1,), reps=5)
    assert again == [
        f"fp8 test_proj {n}x{k} rows=1: tuned before -> {fg.chosen(n, k, True, 1) or '_scaled_mm'}"
    ]


@pytest.mark.gpu
def test_fp8_engine_tunes_every_projection_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An fp8 (W8A8) engine tunes each projection shape at start (the linear report says what it
    chose per row bucket), its projections run that choice within tolerance of the twin, and it
    decodes with CUDA graphs."""
    _fp8_gpu_or_skip()
    from kernels.triton import fp8_gemm as fg
    from kernels.triton.fp8_gemm import ROW_BUCKETS
    from services.worker.request import SamplingParams
    from tests.worker.worker_testlib import quantized_bf16_engine

    engine = quantized_bf16_engine(tmp_path, "fp8")
    assert engine.runner.graphs is not None
    lines = [line for line in engine.runner.linear_report if line.startswith("fp8 ")]
    shapes = {"qkv_proj": "512x256", "o_proj": "256x256", "gate_up_proj": "1024x256", "down_proj": "256x512"}
    for name, shape in shapes.items():
        mine = [line for line in lines if line.startswith(f"fp8 {name} {shape} rows=")]
        assert len(mine) == len(ROW_BUCKETS), (name, lines)
        assert all(re.search(r"-> (_scaled_mm|triton\(|gemv\(|dot\()", line) for line in mine), mine
    proj: Any = engine.runner.model.model.layers[1].mlp.gate_up_proj
    for m in (1, 3, 40):
        x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
        choice = fg.chosen(1024, 256, False, m)
        exact = _fp8_twin(choice)(x.float(), proj.qweight, proj.weight_scale)
        with torch.inference_mode():
            out = proj(x).float()
        assert (out - exact).norm() / exact.norm() < 5e-3, m
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [len(r.token_ids[0]) for r in results] == [16, 16, 16]


CONFIG_CASES = [
    # (M, N, K, bits, group_size (0: per channel), asym)
    (1, 40, 256, 8, 0, False),
    (1, 40, 512, 4, 128, True),
    (3, 24, 256, 4, 64, False),
    (20, 40, 256, 8, 128, False),
    (1, 24, 192, 4, 0, True),  # per-channel zero points, K not a multiple of the tile
]


@pytest.mark.parametrize(("m", "n", "k", "bits", "group_size", "asym"), CONFIG_CASES)
def test_every_candidate_config_matches_reference(
    m: int, n: int, k: int, bits: int, group_size: int, asym: bool
) -> None:
    """Each config the tuner may choose for M rows (gemv, skinny and tiled dots) against the twin,
    on the interpreter in fp32 (the tuner itself runs on CUDA only)."""
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(m * 7 + n + bits)
    _, packed, scales, zeros = quantized_weight(n, k, bits, group_size or k, asym, gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    expected = reference.quant_linear(x, packed, scales, bits, zeros, bias)
    configs = [c for c in candidates(m, bits) if not c.words]  # (words configs: test_quant_gemv.py)
    assert configs
    for config in configs:
        out = quant_gemm(x, packed, scales, bits, zeros, bias, config)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=lambda s, c=config: f"{c}: {s}")


def test_split_nibble_configs_are_4_bit_candidates() -> None:
    """The nibble-split configs (low / high nibbles against x's even / odd columns, no interleave)
    are candidates for 4-bit codes at decode sizes only; the cases above run them against the twin."""
    from kernels.triton.quant_gemm import candidates

    for rows in (1, 4, 16):
        assert any(c.split4 for c in candidates(rows, 4)), rows
        assert not any(c.split4 for c in candidates(rows, 8)), rows
    assert not any(c.split4 for c in candidates(300, 4))
    assert str(next(c for c in candidates(1, 4) if c.split4)).endswith(",split)")


def test_gemv_config_refuses_several_rows() -> None:
    from kernels.triton.quant_gemm import GEMV_CANDIDATES, quant_gemm

    gen = torch.Generator().manual_seed(0)
    _, packed, scales, _ = quantized_weight(8, 64, 8, 64, False, gen)
    with pytest.raises(ValueError, match="takes one row"):
        quant_gemm(torch.randn(2, 64), packed, scales, 8, None, None, GEMV_CANDIDATES[0])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("fmt", ["int8", "int4-g128-asym", "int8-g128", "fp8"])
def test_every_candidate_config_bf16_gpu(m: int, fmt: str) -> None:
    """Each tile config of the quantized GEMM in bf16 on CUDA, within 1e-2 (relative, Frobenius) of
    the fp32 twin, at a model-like shape (the interpreter cases above cover odd shapes)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kernels.triton.quant_gemm import candidates, fp8_weight_only, quant_gemm

    n, k = 1536, 2048
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=gen).cuda().to(torch.bfloat16)
    if fmt == "fp8":
        w, s = fp8_weight_codes(n, k, gen, spread=100, scale=1e-3)
        w, s = w.cuda(), s.cuda()
        exact = reference.fp8_linear(x.float(), w, s, bias.float())
        for config in candidates(m):
            out = fp8_weight_only(x, w, s, bias, config).float()
            assert (out - exact).norm() / exact.norm() < 1e-2, config
        return
    bits = 4 if fmt.startswith("int4") else 8
    group = 128 if "g128" in fmt else k
    _, packed, scales, zeros = quantized_weight(n, k, bits, group, fmt.endswith("asym"), gen)
    packed, scales = packed.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    exact = reference.quant_linear(x.float(), packed, scales, bits, zeros, bias.float())
    for config in candidates(m, bits):
        out = quant_gemm(x, packed, scales, bits, zeros, bias, config).float()
        assert (out - exact).norm() / exact.norm() < 1e-2, config


@pytest.mark.gpu
def test_quant_tuner_and_dispatch_gpu() -> None:
    """`tune_quant_linear` times the configs per row bucket, names its choice in its report, and
    `quant_linear` runs that choice within tolerance of the twin; a second tuning keeps it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kernels.triton import quant_gemm as qg

    n, k = 1024, 2048
    gen = torch.Generator().manual_seed(3)
    layers = [quantized_weight(n, k, 4, 128, True, gen) for _ in range(3)]
    weights = [p.cuda() for _, p, _, _ in layers]
    scales = [s.cuda() for _, _, s, _ in layers]
    zeros = [z.cuda() for _, _, _, z in layers if z is not None]
    lines = qg.tune_quant_linear(weights, scales, zeros, 4, None, "test_proj", rows=(1, 16, 1024), reps=5)
    assert len(lines) == 3, lines
    for line, m in zip(lines, (1, 16, 1024), strict=True):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        choice = qg.chosen(x, weights[0], scales[0], 4, True, False)
        assert line.startswith(f"quant test_proj 4-bit {n}x{k} rows={m}: "), line
        assert line.endswith(f"-> {choice}"), line
        exact = reference.quant_linear(x.float(), weights[0], scales[0], 4, zeros[0])
        out = qg.quant_linear(x, weights[0], scales[0], 4, zeros[0]).float()
        assert (out - exact).norm() / exact.norm() < 1e-2, line
    again = qg.tune_quant_linear(weights, scales, zeros, 4, None, "test_proj", rows=(1,), reps=5)
    assert again[0].endswith(
        "tuned before -> " + str(qg.chosen(x[:1], weights[0], scales[0], 4, True, False))
    )


@pytest.mark.parametrize("m", [1, 5, 20])
def test_fp8_weight_only_every_config_interpreter(m: int) -> None:
    """FP8 weights against unquantized activations (the weight-only GEMM the FP8 tuner may choose
    for decode-sized calls) against its twin `reference.fp8_linear`, every config for M rows."""
    from kernels.triton.quant_gemm import candidates, fp8_weight_only

    gen = torch.Generator().manual_seed(m)
    w, s = fp8_weight_codes(40, 320, gen, spread=50, scale=0.01)
    x = torch.randn(m, 320, generator=gen)
    bias = torch.randn(40, generator=gen)
    expected = reference.fp8_linear(x, w, s, bias)
    for config in (c for c in candidates(m) if not c.words):  # (words configs: test_quant_gemv.py)
        out = fp8_weight_only(x, w, s, bias, config)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=lambda t, c=config: f"{c}: {t}")
