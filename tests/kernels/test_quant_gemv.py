"""The few-row word GEMV (kernels/triton/quant_gemv.py, the `words` configs of quant_gemm.py's
tuner) against the reference twins: every words candidate for one row and for a few rows, each
weight format (int8, 4-bit with and without zero points, e4m3; per channel, per group, a group
holding whole tiles), K spanning several tiles and a partial one, odd N; the fused epilogues; on the
interpreter in fp32 / fp16 (conftest), and in bf16 on CUDA (`gpu`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels import reference
from kernels.ops import QuantFusion
from tests.bench_testlib import run_bench

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-5

# (name, bits, group size (0: per channel), zero points, K)
FORMATS = [
    ("int8", 8, 0, False, 1152),  # K: two tiles of 512 and a quarter, one of 1024 and an eighth
    ("int8-g32-asym", 8, 32, True, 1152),  # a scale (and zero) a word
    ("int4-g128", 4, 128, False, 2304),
    ("int4-g1024-asym", 4, 1024, True, 2048),  # a group holds whole tiles of 1024: a scale a tile
    ("int4-asym", 4, 0, True, 2304),  # per channel with zero points: zero x sum(x) at the end
    ("fp8", 8, 0, False, 1152),
]


def _operands(fmt: str, n: int, gen: torch.Generator, k: int = 0) -> tuple[Any, ...]:
    """(qweight, scales, bits, zeros, K) of a random weight in format `fmt` (K: the format's, or k)."""
    _, bits, group, asym, k_fmt = next(f for f in FORMATS if f[0] == fmt)
    k = k or k_fmt
    if fmt == "fp8":
        w = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        return w, torch.rand(n, 1, generator=gen) * 0.01 + 1e-4, 8, None, k
    groups = k // (group or k)
    if bits == 8:
        packed = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).float() - (128 if bits == 8 else 0)
    return packed, scales, bits, zeros if asym else None, k


def _expected(fmt: str, x: torch.Tensor, qweight, scales, bits, zeros, bias, **fused) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if fmt == "fp8":
        # the twin of e4m3 weights: the weight as fp32 values, per-channel scales (fp8_linear's
        # definition), through the fused twin with an exact stand-in: codes as fp32 "8-bit" values
        w = qweight.float() * scales
        xf = x.float() * fused["norm_weight"].float() if fused.get("norm_weight") is not None else x.float()
        out = xf @ w.t()
        if fused.get("rms_eps") is not None:
            out = out * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + fused["rms_eps"])
        if bias is not None:
            out = out + bias.float()
        if fused.get("gated"):
            half = out.shape[-1] // 2
            out = torch.nn.functional.silu(out[:, :half]) * out[:, half:]
        if fused.get("residual") is not None:
            out = out + fused["residual"].float()
        return out.to(x.dtype)
    return reference.quant_linear_fused(x, qweight, scales, bits, zeros, bias, **fused)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fmt", [f[0] for f in FORMATS])
def test_every_words_config_matches_twin(fmt: str, m: int) -> None:
    """Each words candidate for M rows (one row: the decode set; three: the few-row set, a masked
    fourth row) against the twin in fp32, with a bias."""
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(m * 13 + len(fmt))
    n = 37
    qweight, scales, bits, zeros, k = _operands(fmt, n, gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    expected = _expected(fmt, x, qweight, scales, bits, zeros, bias)
    configs = [c for c in candidates(m, bits) if c.words]
    assert configs
    for config in configs:
        out = quant_gemm(x, qweight, scales, bits, zeros, bias, config)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=lambda s, c=config: f"{c}: {s}")


@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "int4-asym", "fp8"])
def test_words_unmasked_shapes_match_twin(fmt: str) -> None:
    """N a multiple of every candidate's rows a program and K of its tile (the kernel's EVEN path:
    no masks in its loop), plain and with the fused gate/up, against the twin in fp32."""
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(len(fmt))
    n, k = 64, 4096
    qweight, scales, bits, zeros, k = _operands(fmt, n, gen, k)
    x = torch.randn(1, k, generator=gen)
    norm_weight = torch.rand(k, generator=gen) * 1.5 + 0.25
    for gated in (False, True):
        fused: dict[str, Any] = {"gated": True, "norm_weight": norm_weight, "rms_eps": EPS} if gated else {}
        expected = _expected(fmt, x, qweight, scales, bits, zeros, None, **fused)
        configs = [c for c in candidates(1, bits, gated) if c.words]
        assert all(n % c.block_n == 0 and k % c.block_k == 0 for c in configs)
        for config in configs:
            out = quant_gemm(x, qweight, scales, bits, zeros, None, config, **fused)
            torch.testing.assert_close(
                out, expected, atol=1e-4, rtol=1e-4, msg=lambda s, c=config: f"{c}: {s}"
            )


NORM = QuantFusion(norm=True)
NORM_RMS = QuantFusion(norm=True, rms=True)
GATED = QuantFusion(norm=True, rms=True, gated=True)
RESIDUAL = QuantFusion(residual=True)


@pytest.mark.parametrize(
    ("fusion", "fmt"),
    [
        (NORM, "int4-g128"),
        (NORM_RMS, "int8"),
        (GATED, "int4-asym"),
        (GATED, "fp8"),
        (RESIDUAL, "int8-g32-asym"),
    ],
    ids=str,
)
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_words_variants(fusion: QuantFusion, fmt: str, m: int, dtype: torch.dtype) -> None:
    """The decode path's fused epilogues (folded norm weight, 1/rms, SiLU-and-mul of a fused
    [gate; up] weight, residual) in a words config, odd N / 2, against the twin; fp16: x * g
    rounded to fp16 before the product, as the norm's output is."""
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(m + len(fmt) + 3 * fusion.gated)
    n = 2 * 19
    qweight, scales, bits, zeros, k = _operands(fmt, n, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if not fusion.rms else None
    fused: dict[str, Any] = {"gated": fusion.gated}
    if fusion.norm:
        fused["norm_weight"] = (torch.rand(k, generator=gen) * 1.5 + 0.25).to(dtype)
    if fusion.rms:
        fused["rms_eps"] = EPS
    if fusion.residual:
        fused["residual"] = torch.randn(m, n, generator=gen).to(dtype)
    expected = _expected(fmt, x, qweight, scales, bits, zeros, bias, **fused).float()
    config = next(c for c in candidates(m, bits, fusion.gated) if c.words)
    out = quant_gemm(x, qweight, scales, bits, zeros, bias, config, **fused)
    assert out.dtype == dtype and out.shape == expected.shape
    err = float((out.float() - expected).norm() / expected.norm())
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), (config, err)


def test_words_configs_are_few_row_candidates() -> None:
    """Words configs are tuner candidates for 1 to 4 rows only, refuse more rows, and a tuned
    words choice is taken for calls of up to 4 rows (the default config beyond)."""
    from kernels.triton import quant_gemm as qg

    for rows in (1, 2, 4):
        for bits in (4, 8):
            assert any(c.words for c in qg.candidates(rows, bits)), (rows, bits)
    for rows in (5, 16, 300):
        assert not any(c.words for c in qg.candidates(rows, 8)), rows
    config = qg.WORDS_CANDIDATES[8][0]
    assert str(config).startswith("words(m4,") and config.takes(4) and not config.takes(5)
    gen = torch.Generator().manual_seed(0)
    qweight, scales, bits, _, k = _operands("int8", 24, gen)
    with pytest.raises(ValueError, match="takes at most 4 rows"):
        qg.quant_gemm(torch.randn(5, k), qweight, scales, bits, None, None, config)
    key = qg._key(24, k, 8, 1, False, False, 4)
    qg._CHOICE[key] = config
    try:
        for m in (2, 3, 4):
            x = torch.randn(m, k, generator=gen)
            assert qg.chosen(x, qweight, scales, 8, False, False) == config
            torch.testing.assert_close(
                qg.quant_linear(x, qweight, scales, 8),
                reference.quant_linear(x, qweight, scales, 8),
                atol=1e-4,
                rtol=1e-4,
            )
    finally:
        del qg._CHOICE[key]


def test_words_config_names_what_it_cannot_run() -> None:
    """A weight whose rows are not whole 32-bit words (4-bit K = 100: 50 bytes a row) is refused
    with the reason, not computed wrong (the tuner then skips the config as failed)."""
    from kernels.triton.quant_gemm import WORDS_CANDIDATES, quant_gemm

    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (8, 50), generator=gen, dtype=torch.int32).to(torch.uint8)
    with pytest.raises(ValueError, match="not a multiple of the 8 codes a word"):
        quant_gemm(torch.randn(1, 100), q, torch.rand(8, 1), 4, None, None, WORDS_CANDIDATES[4][0])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [3 * 1024 + 2, 4096])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "int4-g128-asym", "fp8"])
def test_every_words_config_bf16_gpu(m: int, fmt: str, n: int) -> None:
    """Each words config in bf16 on CUDA at a Llama-3.1-8B-like shape (K = 4096; N = 3,074 leaves
    partial row tiles and an odd gated half, N = 4,096 fills every tile: the unmasked loop), plain
    and fused (norm + 1/rms + SiLU, and residual), within 1e-2 (relative) of the fp32 twin; a CUDA
    graph replay equals the eager call bitwise (no split-K: a fixed sum order)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kernels.triton.quant_gemm import candidates, quant_gemm

    k = 4096
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    g = (1.0 + 0.1 * torch.randn(k, generator=gen)).to(torch.bfloat16).cuda()
    residual = torch.randn(m, n, generator=gen).to(torch.bfloat16).cuda()
    if fmt == "fp8":
        qweight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales, bits, zeros = torch.rand(n, 1, generator=gen) * 1e-3, 8, None
    else:
        bits = 4 if fmt.startswith("int4") else 8
        group = 128 if "g128" in fmt else k
        q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
        qweight = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8) if bits == 4 else (q - 128).to(torch.int8)
        scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
        zeros = torch.randint(0, 16, (n, k // group), generator=gen).float() if fmt.endswith("asym") else None
    qweight, scales = qweight.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    dense = (
        qweight.float() * scales
        if fmt == "fp8"
        else reference.dequantize_weight(qweight, scales, bits, zeros)
    )
    variants: list[tuple[dict[str, Any], torch.Tensor]] = []
    plain = x.float() @ dense.t()
    variants.append(({}, plain))
    inv = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
    gu = (x.float() * g.float()) @ dense[: n - n % 2].t() * inv
    half = gu.shape[1] // 2
    gated = torch.nn.functional.silu(gu[:, :half]) * gu[:, half:]
    variants.append(({"norm_weight": g, "rms_eps": EPS, "gated": True}, gated))
    variants.append(({"residual": residual}, plain + residual.float()))
    for fused, exact in variants:
        w = qweight[: n - n % 2] if fused.get("gated") else qweight
        s = scales[: w.shape[0]]
        z = zeros[: w.shape[0]] if zeros is not None else None
        for config in (c for c in candidates(m, bits, bool(fused.get("gated"))) if c.words):
            out = quant_gemm(x, w, s, bits, z, None, config, **fused)
            err = float((out.float() - exact).norm() / exact.norm())
            assert err < 1e-2, (config, fused.keys(), err)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = quant_gemm(x, w, s, bits, z, None, config, **fused)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(replayed, out), config


def test_quant_bench_gemv_only_smoke(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """benchmarks/quant_bench.py --smoke --gemv-only (interpreter, one tiny shape) times bf16 and a
    config of each kind (today's kernel, a words config) per format, each checked against the twin."""
    out = tmp_path / "gemv.json"
    report, _ = run_bench("quant_bench.py", "--smoke", "--gemv-only", out=out, env={"TRITON_INTERPRET": "1"})
    rows = report["gemv"]
    assert [r["kernel"] for r in rows if r["format"] == "bf16"] == ["F.linear"]
    for fmt in ("int8", "int4 g128", "fp8 weight-only"):
        kinds = [r["kernel"].split("(")[0] for r in rows if r["format"] == fmt]
        assert "words" in kinds and len(kinds) == 2, (fmt, kinds)
    assert all(r["rel_err"] < 1e-5 and r["us"] > 0 for r in rows if r["format"] != "bf16"), rows


# (bits, e4m3, zero points, scale mode, BLOCK_M, fused gate/up, EVEN): int8 per channel one row;
# int4 g128 with zeros and the fused gate/up (norm, 1/rms, SiLU), unmasked; e4m3 four rows fused;
# e4m3 one row unmasked; int4 with a group holding whole tiles, four rows, unmasked
SM90_CASES = [
    (8, False, False, 0, 1, False, False),
    (4, False, True, 2, 1, True, True),
    (8, True, False, 0, 4, True, False),
    (8, True, False, 0, 1, False, True),
    (4, False, False, 1, 4, False, True),
]
_SM90_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton.quant_gemv import _quant_gemv_kernel

out = []
for bits, fp8, zeros, scales, block_m, fused, even in json.loads(sys.argv[1]):
    consts = dict(BITS=bits, FP8=fp8, HAS_ZEROS=zeros, HAS_BIAS=not fused, SCALES=scales, NORM=fused,
                  RMS_EPS=1e-5 if fused else None, GATED=fused, HAS_RESIDUAL=False, EARLY_SIGNAL=fused,
                  BLOCK_M=block_m, BLOCK_N=16, BLOCK_W=128, PREFETCH=block_m > 1, PDL=True,
                  EVEN=even)
    pointers = {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32"}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "*bf16" if n.endswith("_ptr") else "i32")
                 for n in _quant_gemv_kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=_quant_gemv_kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    out.append(compiled.asm["ttgir"])
print(json.dumps(out))
"""


def test_words_loop_has_one_layout_on_sm90() -> None:
    """The kernel compiled for sm_90 (no GPU needed: Triton's compiler down to TTGIR, in a process
    without the interpreter) converts no layout inside its K loop: every load of the loop shares one
    layout (words first, the word index not seen as contiguous), so no tile crosses shared memory
    per code; the only conversions are in the epilogue. Loaded as 16-byte vectors beside the
    strided x loads, each code's tile crossed shared memory (four conversions a tile for int8)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _SM90_SCRIPT, json.dumps(SM90_CASES)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for case, ttgir in zip(SM90_CASES, json.loads(run.stdout), strict=True):
        loop = ttgir[ttgir.index("scf.for") : ttgir.index("scf.yield")]
        assert "tt.load" in loop and "convert_layout" not in loop, case
        assert ttgir.count("ttg.convert_layout") <= 2, (case, ttgir.count("ttg.convert_layout"))
