"""The quantized GEMM's folded-norm decode fusions (kernels/triton/quant_gemm.py `quant_linear_fused`):
the norm weight on x, the row's 1/rms, SiLU-and-mul and the residual add inside the GEMM. Each
variant and each candidate config against the twin `reference.quant_linear_fused` on the Triton
interpreter (fp32, fp16), the twin against the ops it replaces, the dispatch of a tuned choice,
and a quantized model folded into its GEMMs against the same model unfolded. The `gpu` cases run
bf16 on CUDA, the tuner included."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from kernel_cases import UNFOLDED_OPS, fp8_weight_codes, quantized_weight, triton_quant_ops

from kernels import REFERENCE_OPS, reference
from kernels.ops import QuantFusion

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-5
NORM = QuantFusion(norm=True)
NORM_RMS = QuantFusion(norm=True, rms=True)
GATED = QuantFusion(norm=True, rms=True, gated=True)
RESIDUAL = QuantFusion(residual=True)
FUSIONS = [NORM, NORM_RMS, GATED, RESIDUAL]

# (name, bits, group size (0: per channel), zero points)
FORMATS = [
    ("int8", 8, 0, False),
    ("int8-g32", 8, 32, False),
    ("int4-g64-asym", 4, 64, True),
    ("int4-g48", 4, 48, False),  # groups of 48: per-element scales (no tile of >= 32 fits)
    ("int4-asym", 4, 0, True),  # per channel with zero points: zero x sum(x * g) at the end
    ("fp8", 8, 0, False),
]


def _operands(fmt: str, n: int, k: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
    """(qweight, scales, bits, zeros) of a random weight in format `fmt`."""
    if fmt == "fp8":
        return *fp8_weight_codes(n, k, gen, spread=50, scale=0.01, floor=1e-4), 8, None
    _, bits, group, asym = next(f for f in FORMATS if f[0] == fmt)
    _, packed, scales, zeros = quantized_weight(n, k, bits, group or k, asym, gen)
    return packed, scales, bits, zeros


def _fused_args(fusion: QuantFusion, m: int, n: int, k: int, gen: torch.Generator) -> dict[str, Any]:
    args: dict[str, Any] = {"gated": fusion.gated}
    if fusion.norm:
        args["norm_weight"] = torch.rand(k, generator=gen) * 1.5 + 0.25
    if fusion.rms:
        args["rms_eps"] = EPS
    if fusion.residual:
        args["residual"] = torch.randn(m, n, generator=gen)
    return args


@pytest.mark.parametrize("fusion", FUSIONS, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_twin_is_the_ops_it_replaces(fusion: QuantFusion, with_bias: bool) -> None:
    """reference.quant_linear_fused = RMSNorm (with its weight) then quant_linear then SiLU-and-mul
    or + residual, all in fp32 (the unfused path's definition)."""
    gen = torch.Generator().manual_seed(1)
    m, n, k = 5, 48, 128
    qweight, scales, bits, zeros = _operands("int4-g64-asym", n, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen) if with_bias else None
    args = _fused_args(fusion, m, n, k, gen)
    xin = x
    if fusion.norm:
        g = args["norm_weight"]
        xin = reference.rms_norm(x, g, EPS) if fusion.rms else x * g
    y = reference.quant_linear(xin, qweight, scales, bits, zeros, bias)
    if fusion.gated:
        y = reference.silu_and_mul(y)
    if fusion.residual:
        y = y + args["residual"]
    out = reference.quant_linear_fused(x, qweight, scales, bits, zeros, bias, **args)
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS, ids=str)
@pytest.mark.parametrize("fmt", [f[0] for f in FORMATS])
@pytest.mark.parametrize("m", [1, 7])
def test_every_config_of_each_variant_matches_twin(fusion: QuantFusion, fmt: str, m: int) -> None:
    """Each candidate config for M rows (one row: the gemv configs with the x row preloaded for
    the 1/rms, and the skinny dots; seven rows: the 1/rms summed from the x tiles) in fp32 on the
    interpreter, odd N (and N / 2 for SiLU), with a bias."""
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(m * 31 + len(fmt))
    n, k = 2 * 37, 192
    qweight, scales, bits, zeros = _operands(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    args = _fused_args(fusion, m, n, k, gen)
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, bias, **args)
    assert expected.shape == (m, n // 2 if fusion.gated else n)
    for config in (c for c in candidates(m, bits, fusion.gated) if not c.words):  # (test_quant_gemv.py)
        out = quant_gemm(x, qweight, scales, bits, zeros, bias, config, **args)
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4, msg=lambda s, c=config: f"{c}: {s}")


@pytest.mark.parametrize("fusion", FUSIONS, ids=str)
@pytest.mark.parametrize("m", [1, 4])
def test_fused_variants_fp16(fusion: QuantFusion, m: int) -> None:
    """fp16 activations (x * g rounded to fp16 before the product, as a norm's output is)."""
    from kernels.triton.quant_gemm import quant_linear_fused

    gen = torch.Generator().manual_seed(m + 5)
    n, k = 40, 256
    qweight, scales, bits, zeros = _operands("int8", n, k, gen)
    x = torch.randn(m, k, generator=gen).half()
    args = {
        key: (v.half() if isinstance(v, torch.Tensor) else v)
        for key, v in _fused_args(fusion, m, n, k, gen).items()
    }
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    out = quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    assert out.dtype == torch.float16
    # (relative to the whole output: silu(gate) * up multiplies the rounding of x * g by gate/up)
    err = float((out.float() - expected.float()).norm() / expected.float().norm())
    assert err < 2e-3, err


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_gated_candidates_cover_the_plain_ones(bits: int, rows: int) -> None:
    """The gated variant's tuner times every plain decode config (the same gemv / n32 / k512 space
    as the unfused GEMM) and each at twice its BLOCK_N: BLOCK_N gate rows and the matching BLOCK_N
    up rows, the plain config's outputs per program. Tiled (prefill) configs are not fused."""
    from kernels.triton.quant_gemm import candidates

    plain, gated = candidates(rows, bits), candidates(rows, bits, gated=True)
    assert gated[: len(plain)] == plain and len(set(gated)) == len(gated)
    for config in plain:
        if config.words and config.block_n * config.block_k > 16384:  # (doubled, it would spill)
            continue
        assert dataclasses.replace(config, block_n=2 * config.block_n) in gated, config
    assert any(not c.dot and not c.words for c in gated) == (rows == 1)
    assert any(c.words for c in gated) == (rows <= 4)  # the word GEMV: one to four rows
    assert candidates(300, bits, gated=True) == candidates(300, bits)


def test_dispatch_runs_the_tuned_fused_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quant_linear_fused` takes the choice kept for its variant and row bucket (a gemv choice only
    for one row), else the default config; each variant has its own entry."""
    from kernels.triton import quant_gemm as qg

    gen = torch.Generator().manual_seed(2)
    n, k = 64, 256
    qweight, scales, bits, zeros = _operands("int8", n, k, gen)
    gemv = qg.GEMV_CANDIDATES[2]
    key = (*qg._key(n, k, bits, 1, False, False, 1), GATED)
    monkeypatch.setitem(qg._FUSED_CHOICE, key, gemv)
    x = torch.randn(1, k, generator=gen)
    assert qg.chosen_fused(x, qweight, scales, bits, False, False, GATED) == gemv
    assert qg.chosen_fused(x, qweight, scales, bits, False, False, NORM_RMS) == qg.default_config(1)
    assert qg.chosen(x, qweight, scales, bits, False, False) == qg.default_config(1)  # unfused: its own
    args = _fused_args(GATED, 1, n, k, gen)
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    out = qg.quant_linear_fused(x, qweight, scales, bits, None, None, **args)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
    # bucket 4 (two to four rows) has no choice; one kept as a gemv would not apply to it either
    monkeypatch.setitem(qg._FUSED_CHOICE, (*qg._key(n, k, bits, 1, False, False, 4), GATED), gemv)
    assert qg.chosen_fused(
        torch.randn(3, k), qweight, scales, bits, False, False, GATED
    ) == qg.default_config(3)


def test_fp8_and_int8_choices_are_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 choice (fused or not) is not an fp8 one of the same shape: both are 8-bit codes, and
    one process may tune both (quant_bench ran int8 then fp8, and fp8's fused GEMMs ran int8's
    choices, "tuned before", never timed on e4m3 codes)."""
    from kernels.triton import quant_gemm as qg

    gen = torch.Generator().manual_seed(3)
    n, k = 64, 256
    int8_w, int8_s, bits, _ = _operands("int8", n, k, gen)
    fp8_w, fp8_s, _, _ = _operands("fp8", n, k, gen)
    gemv = qg.GEMV_CANDIDATES[2]
    monkeypatch.setitem(qg._FUSED_CHOICE, (*qg._key(n, k, bits, 1, False, False, 1), GATED), gemv)
    monkeypatch.setitem(qg._CHOICE, qg._key(n, k, bits, 1, False, False, 1), gemv)
    x = torch.randn(1, k, generator=gen)
    assert qg.chosen_fused(x, int8_w, int8_s, bits, False, False, GATED) == gemv
    assert qg.chosen_fused(x, fp8_w, fp8_s, bits, False, False, GATED) == qg.default_config(1)
    assert qg.chosen(x, int8_w, int8_s, bits, False, False) == gemv
    assert qg.chosen(x, fp8_w, fp8_s, bits, False, False) == qg.default_config(1)


def test_gated_runs_two_launches_where_the_tuner_measured_them_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gated key the tuner found faster as the GEMM then the SiLU kernel (`_GATED_SPLIT`) runs
    those two (the gate/up sums rounded once in between), the same function as the twin."""
    from kernels.triton import quant_gemm as qg

    gen = torch.Generator().manual_seed(6)
    n, k, m = 64, 256, 3
    qweight, scales, bits, zeros = _operands("int4-g64-asym", n, k, gen)
    key = (*qg._key(n, k, bits, scales.shape[1], True, False, m), GATED)
    monkeypatch.setitem(qg._FUSED_CHOICE, key, qg.SKINNY_CANDIDATES[0])
    monkeypatch.setattr(qg, "_GATED_SPLIT", {key})
    calls: list[int] = []
    pair = qg._gated_pair
    monkeypatch.setattr(qg, "_gated_pair", lambda *a, **kw: calls.append(1) or pair(*a, **kw))
    x = torch.randn(m, k, generator=gen) * 3
    args = _fused_args(GATED, m, n, k, gen)
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    out = qg.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    assert calls == [1]
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("fusion", FUSIONS, ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_runs_unfused_where_the_tuner_measured_it_faster(
    fusion: QuantFusion, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused key the tuner found slower than what it replaces (`_UNFUSED`: the norm kernel, the
    plain GEMM in its own config, the SiLU kernel or the residual add) runs that sequence, the same
    function as the twin; a gemv config kept for one row is not used for three."""
    from kernels.triton import quant_gemm as qg

    gen = torch.Generator().manual_seed(8 + m)
    n, k = 64, 256
    qweight, scales, bits, zeros = _operands("int4-g64-asym", n, k, gen)
    plain = qg.GEMV_CANDIDATES[0] if m == 1 else qg.SKINNY_CANDIDATES[1]
    key = (*qg._key(n, k, bits, scales.shape[1], True, False, m), fusion)
    monkeypatch.setitem(qg._FUSED_CHOICE, key, qg.SKINNY_CANDIDATES[0])
    monkeypatch.setattr(qg, "_UNFUSED", {key: plain})
    configs: list[Any] = []
    sequence = qg._unfused_sequence
    monkeypatch.setattr(qg, "_unfused_sequence", lambda *a, **kw: configs.append(a[6]) or sequence(*a, **kw))
    x = torch.randn(m, k, generator=gen) * 3
    args = _fused_args(fusion, m, n, k, gen)
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    out = qg.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)
    assert configs == [plain]
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
    if m == 1:  # the gemv choice of bucket 1 does not serve the bucket-4 call (two to four rows)
        monkeypatch.setattr(qg, "_UNFUSED", {(*key[:-3], qg._bucket(3), key[-2], fusion): plain})
        x3 = torch.randn(3, k, generator=gen)
        args3 = _fused_args(fusion, 3, n, k, gen)
        qg.quant_linear_fused(x3, qweight, scales, bits, zeros, None, **args3)
        assert configs == [plain]


def test_keep_fused_rule() -> None:
    """`keep_fused`: in the order of their launches (fused, gated pair, unfused sequence) each
    replaces the choice so far only where more than FUSE_MIN_GAIN faster; TANDEM_QUANT_FUSE=always
    keeps the fused launch, never the unfused sequence wherever it was measured."""
    from kernels.triton.quant_gemm import FUSE_MIN_GAIN, keep_fused

    gain = FUSE_MIN_GAIN
    assert gain > 1.0
    assert keep_fused(10.0, None, None) == "fused"
    assert keep_fused(10.0, None, 10.0 / gain * 1.001) == "fused"  # within the margin: one launch
    assert keep_fused(10.0, None, 10.0 / gain * 0.999) == "unfused"
    assert keep_fused(10.0, 10.0 / gain * 0.999, None) == "pair"
    assert keep_fused(10.0, 9.9, 9.8) == "fused"  # both within the margin of the fused launch
    assert keep_fused(10.0, 8.0, 8.0 / gain * 1.001) == "pair"  # the sequence within the pair's margin
    assert keep_fused(10.0, 8.0, 7.0) == "unfused"
    assert keep_fused(10.0, 5.0, 9.0) == "pair"
    assert keep_fused(10.0, 5.0, 5.0, min_gain=1.0) == "pair"  # equal: the fewer launches
    for pair_s, unfused_s in ((None, None), (5.0, None), (5.0, 4.0), (None, 4.0)):
        assert keep_fused(10.0, pair_s, unfused_s, "always") == "fused"
    assert keep_fused(10.0, 5.0, 20.0, "never") == "unfused"
    assert keep_fused(10.0, 5.0, None, "never") == "fused"  # (no sequence within tolerance)


def test_tuner_decision_is_recorded_and_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_record_fused` (the tuner's last step for a fused key) keeps `keep_fused`'s choice under the
    TANDEM_QUANT_FUSE mode for `quant_linear_fused` and records the measured times beside it
    (`fused_decisions`, `FusedDecision.summary` in microseconds); a later decision for the key
    replaces the gated pair or the unfused sequence kept before."""
    from kernels.triton import quant_gemm as qg
    from services.common import switches

    for name in ("_FUSED_CHOICE", "_UNFUSED", "_FUSED_DECISIONS"):
        monkeypatch.setattr(qg, name, {})
    monkeypatch.setattr(qg, "_GATED_SPLIT", set())
    gen = torch.Generator().manual_seed(12)
    n, k, m = 64, 256, 1
    qweight, scales, bits, zeros = _operands("int8", n, k, gen)
    key = (*qg._key(n, k, bits, 1, False, False, m), GATED)
    fused, plain = qg.GEMV_CANDIDATES[0], qg.GEMV_CANDIDATES[2]
    launches: list[str] = []
    sequence, pair = qg._unfused_sequence, qg._gated_pair
    monkeypatch.setattr(
        qg, "_unfused_sequence", lambda *a, **kw: launches.append("unfused") or sequence(*a, **kw)
    )
    monkeypatch.setattr(qg, "_gated_pair", lambda *a, **kw: launches.append("pair") or pair(*a, **kw))
    x = torch.randn(m, k, generator=gen) * 3
    args = _fused_args(GATED, m, n, k, gen)
    expected = reference.quant_linear_fused(x, qweight, scales, bits, zeros, None, **args)

    def decide(mode: str, fused_s: float, pair_s: float | None, unfused_s: float | None) -> str:
        decision = qg._record_fused(key, "quant p", m, fused, fused_s, pair_s, plain, unfused_s, mode)
        launches.clear()
        out = qg.quant_linear_fused(x, qweight, scales, bits, None, None, **args)
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
        assert qg.chosen_fused(x, qweight, scales, bits, False, False, GATED) == fused
        assert qg.fused_decisions() == [decision]  # one record a key, the latest
        return launches[0] if launches else "fused"

    auto = switches.QUANT_FUSE.read({})
    assert decide(auto, 10e-6, 12e-6, 9.9e-6) == "fused"  # the sequence within the margin
    summary = qg.fused_decisions()[0].summary()
    assert summary == {
        "label": "quant p",
        "rows": 1,
        "config": str(fused),
        "fused_us": pytest.approx(10.0),
        "pair_us": pytest.approx(12.0),
        "unfused_config": str(plain),
        "unfused_us": pytest.approx(9.9),
        "kept": "fused",
        "verdict": str(fused),
        "mode": "auto",
    }
    assert decide(auto, 10e-6, 8e-6, None) == "pair"
    assert qg.fused_decisions()[0].verdict() == f"{fused} + SiLU"
    assert decide(auto, 10e-6, 8e-6, 6e-6) == "unfused" and key not in qg._GATED_SPLIT
    assert qg.fused_decisions()[0].verdict() == f"unfused {plain}"
    always = switches.QUANT_FUSE.read({"TANDEM_QUANT_FUSE": "always"})
    assert decide(always, 10e-6, 5e-6, 4e-6) == "fused" and key not in qg._UNFUSED
    assert qg.fused_decisions()[0].summary()["mode"] == "always"
    never = switches.QUANT_FUSE.read({"TANDEM_QUANT_FUSE": "never"})
    assert decide(never, 5e-6, 6e-6, 20e-6) == "unfused"


def test_gated_refuses_a_residual_and_odd_rows() -> None:
    from kernels.triton.quant_gemm import default_config, quant_gemm

    gen = torch.Generator().manual_seed(0)
    qweight, scales, bits, _ = _operands("int8", 33, 64, gen)
    with pytest.raises(ValueError, match="gated weight"):
        quant_gemm(torch.randn(1, 64), qweight, scales, bits, None, None, default_config(1), gated=True)


# --- a quantized model with its norms folded into its GEMMs ---


@pytest.mark.parametrize(("quantization", "group_size"), [("int8", 0), ("fp8", 0), ("int4", 32)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_model_folds_into_its_gemms(
    quantization: str, group_size: int, backend: str, tmp_path: Path
) -> None:
    """A quantized Llama (random norm weights) folds its norms into its GEMMs: its codes stay the
    checkpoint's quantization, its norms keep their weights, and its logits (a prefill, then a
    one-token decode step on the folded forward) equal the same quantized model unfolded, on the
    twin and on the Triton GEMM (interpreter). Before the fusions a quantized model never folded."""
    from services.worker.loader import build_model
    from tests.worker.worker_testlib import model_logits, saved_config, tiny_folding_model

    hf = tiny_folding_model("llama", seed=11)
    cfg = saved_config(hf, tmp_path)
    ops = triton_quant_ops() if backend == "triton" else REFERENCE_OPS
    cpu = torch.device("cpu")
    folded = build_model(cfg, ops, cpu, torch.float32, "auto", 0, quantization, group_size)
    unfolded = build_model(cfg, UNFOLDED_OPS, cpu, torch.float32, "auto", 0, quantization, group_size)
    assert folded.norms_folded and not unfolded.norms_folded
    layer: Any = folded.model.layers[1]
    assert layer.norm_weights_in_gemm
    g = hf.model.layers[1].post_attention_layernorm.weight.detach()
    assert torch.equal(layer.post_attention_layernorm.weight, g)
    mine, theirs = layer.mlp.gate_up_proj, unfolded.model.layers[1].mlp.gate_up_proj
    assert torch.equal(mine.qweight.view(torch.uint8), theirs.qweight.view(torch.uint8))
    prompt = [1, 17, 99, 5, 64, 3, 120, 42, 8, 77]
    torch.testing.assert_close(
        model_logits(folded, prompt), model_logits(unfolded, prompt), atol=1e-4, rtol=1e-4
    )


def test_unfolded_quantized_model_fuses_silu_into_gate_up(tmp_path: Path) -> None:
    """A quantized Qwen2 (qkv bias: its norms stay unfolded) runs its decode step's gate/up with
    SiLU-and-mul in the quantized GEMM's epilogue (the Triton GEMM on the interpreter) and gives
    the logits of the same model with the GEMM and the SiLU op apart (the reference bundle)."""
    from kernels.triton import quant_gemm as qg
    from services.worker.loader import build_model
    from tests.worker.worker_testlib import model_logits, saved_config, tiny_folding_model

    cfg = saved_config(tiny_folding_model("qwen2", seed=12), tmp_path)
    gated: list[bool] = []

    def fused(*args: Any, **kwargs: Any) -> torch.Tensor:
        gated.append(bool(kwargs.get("gated")))
        return qg.quant_linear_fused(*args, **kwargs)

    ops = dataclasses.replace(
        REFERENCE_OPS,
        quant_linear=qg.quant_linear,
        quant_linear_fused=fused,
        linear_silu_and_mul=reference.linear_silu_and_mul,  # (the Triton bundle's op slot is filled)
    )
    cpu = torch.device("cpu")
    model = build_model(cfg, ops, cpu, torch.float32, "auto", 0, "int8", 0)
    plain = build_model(cfg, REFERENCE_OPS, cpu, torch.float32, "auto", 0, "int8", 0)
    assert not model.norms_folded
    prompt = [1, 17, 99, 5, 64, 3, 120, 42]
    torch.testing.assert_close(model_logits(model, prompt), model_logits(plain, prompt), atol=1e-4, rtol=1e-4)
    # each layer's gate/up in the prefill (7 rows) and the decode step (1 row): <= 16 rows each
    assert gated == [True] * 2 * cfg.num_layers


def test_quant_fusions_per_projection() -> None:
    """What the engine tunes for each projection of a folded quantized model (quant_fusions)."""
    from services.worker.models.llama import quant_fusions

    assert quant_fusions("qkv_proj", True) == (NORM, NORM_RMS)
    assert quant_fusions("gate_up_proj", True) == (GATED,)
    assert quant_fusions("o_proj", True) == quant_fusions("down_proj", True) == (RESIDUAL,)
    assert quant_fusions("lm_head", True) == quant_fusions("lm_head", False) == ()
    # unfolded (Qwen2's qkv bias, Qwen3's q/k norms): gate/up's SiLU-and-mul only
    assert quant_fusions("gate_up_proj", False) == (QuantFusion(gated=True),)
    assert quant_fusions("qkv_proj", False) == quant_fusions("down_proj", False) == ()
    assert [str(f) for f in FUSIONS] == ["norm", "norm+rms", "norm+rms+silu", "residual"]


# --- bf16 on the GPU ---


def _cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("fmt", ["int8", "int4-g64-asym", "int8-g32", "fp8"])
def test_every_config_of_each_variant_bf16_gpu(m: int, fmt: str) -> None:
    """Each fused variant in each candidate config in bf16, within 1e-2 (relative, Frobenius) of
    the fp32 twin, at a Llama-like shape (hidden 4096 -> 2 x 1792)."""
    _cuda_or_skip()
    from kernels.triton.quant_gemm import candidates, quant_gemm

    gen = torch.Generator().manual_seed(m)
    n, k = 3584, 4096
    qweight, scales, bits, zeros = _operands(fmt, n, k, gen)
    qweight, scales = qweight.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    x = (torch.randn(m, k, generator=gen) * 3).cuda().to(torch.bfloat16)
    for fusion in FUSIONS:
        args = {
            key: (v.cuda().to(torch.bfloat16) if isinstance(v, torch.Tensor) else v)
            for key, v in _fused_args(fusion, m, n, k, gen).items()
        }
        exact = reference.quant_linear_fused(x.float(), qweight, scales, bits, zeros, None, **args)
        for config in candidates(m, bits, fusion.gated):
            out = quant_gemm(x, qweight, scales, bits, zeros, None, config, **args).float()
            err = float((out - exact).norm() / exact.norm())
            assert err < 1e-2, (fusion, config, err)


@pytest.mark.gpu
def test_fused_tuner_and_dispatch_gpu() -> None:
    """`tune_quant_linear(fusion=...)` times every candidate of the variant at the decode buckets,
    names its choice, and `quant_linear_fused` runs it within tolerance; the unfused choice is its
    own; a second tuning keeps the choice."""
    _cuda_or_skip()
    from kernels.triton import quant_gemm as qg

    n, k = 2048, 1024
    gen = torch.Generator().manual_seed(4)
    layers = [_operands("int4-g64-asym", n, k, gen) for _ in range(3)]
    weights = [w.cuda() for w, _, _, _ in layers]
    scales = [s.cuda() for _, s, _, _ in layers]
    zeros = [z.cuda() for _, _, _, z in layers]
    lines = qg.tune_quant_linear(weights, scales, zeros, 4, None, "gate_up_proj", reps=5, fusion=GATED)
    assert len(lines) == len(qg.FUSED_ROWS), lines
    g = torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5
    for line, m in zip(lines, qg.FUSED_ROWS, strict=True):
        assert line.startswith(f"quant gate_up_proj 4-bit {n}x{k} norm+rms+silu rows={m}: "), line
        timed = re.findall(r"(?:gemv|dot)\([^)]*\) [\d.]+ us", line)
        assert timed, line  # (a config this GPU cannot compile is reported as failed, not chosen)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        choice = qg.chosen_fused(x, weights[0], scales[0], 4, True, False, GATED)
        unfused = qg._UNFUSED.get((*qg._key(n, k, 4, scales[0].shape[1], True, False, m), GATED))
        kept = (f"-> {choice}", f"-> {choice} + SiLU") if unfused is None else (f"-> unfused {unfused}",)
        assert line.endswith(kept), line  # (+ SiLU: two launches; unfused: the norm, GEMM, SiLU)
        assert "GEMM + SiLU " in line, line  # the pair it was measured against
        assert ", unfused " in line, line  # and the kernels it replaces (the safety net)
        out = qg.quant_linear_fused(x, weights[0], scales[0], 4, zeros[0], None, g, EPS, True).float()
        exact = reference.quant_linear_fused(
            x.float(), weights[0], scales[0], 4, zeros[0], None, g, EPS, True
        )
        assert (out - exact).norm() / exact.norm() < 1e-2, line
    again = qg.tune_quant_linear(weights, scales, zeros, 4, None, "gate_up_proj", rows=(1,), fusion=GATED)
    assert "tuned before" in again[0], again


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_tuner_keeps_a_fusion_only_where_faster_gpu(fmt: str) -> None:
    """Every fused variant's tuning line times what it replaces ("unfused <config>": the norm kernel,
    the plain GEMM, the residual add) after the candidates, and `quant_linear_fused` runs the kept
    choice (fused, or that sequence) within tolerance; int8 and fp8 of one shape are tuned apart."""
    _cuda_or_skip()
    from kernels.triton import quant_gemm as qg

    n, k = 2048, 1024
    gen = torch.Generator().manual_seed(9)
    layers = [_operands(fmt, n, k, gen) for _ in range(2)]
    weights = [w.cuda() for w, _, _, _ in layers]
    scales = [s.cuda() for _, s, _, _ in layers]
    for fusion in (NORM, NORM_RMS, RESIDUAL):
        lines = qg.tune_quant_linear(weights, scales, None, 8, None, "proj", reps=5, fusion=fusion)
        assert len(lines) == len(qg.FUSED_ROWS), lines
        for line, m in zip(lines, qg.FUSED_ROWS, strict=True):
            assert "tuned before" not in line, line  # (fp8 not served int8's choice)
            assert ", unfused " in line, line
            x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
            args = {
                key: (v.cuda().to(torch.bfloat16) if isinstance(v, torch.Tensor) else v)
                for key, v in _fused_args(fusion, m, n, k, gen).items()
            }
            out = qg.quant_linear_fused(x, weights[0], scales[0], 8, None, None, **args).float()
            exact = reference.quant_linear_fused(x.float(), weights[0], scales[0], 8, None, None, **args)
            assert (out - exact).norm() / exact.norm() < 1e-2, line


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int8", "fp8", "int4"])
def test_quantized_engine_folds_and_tunes_the_fused_gemms_gpu(quantization: str, tmp_path: Path) -> None:
    """A quantized bf16 engine folds its norms into its GEMMs, tunes each projection's fused
    variants at start (report lines) and decodes with CUDA graphs. (Its accuracy against
    transformers: tests/kernels/test_engine_gpu.py::test_quantized_weights_stay_close_to_transformers,
    which now runs the folded path.)"""
    _cuda_or_skip()
    from services.worker.request import SamplingParams
    from tests.worker.worker_testlib import quantized_bf16_engine

    engine = quantized_bf16_engine(tmp_path, quantization, initializer_range=0.1)
    assert engine.runner.model.norms_folded and engine.runner.graphs is not None
    report = engine.runner.linear_report
    bits = 4 if quantization == "int4" else 8
    for name, fusion in (("qkv_proj", "norm"), ("gate_up_proj", "norm+rms+silu"), ("down_proj", "residual")):
        mine = [
            line
            for line in report
            if line.startswith(f"quant {name} {bits}-bit") and f" {fusion} rows=" in line
        ]
        assert len(mine) == 3, (name, fusion, report)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [len(r.token_ids[0]) for r in results] == [16, 16, 16]
