"""Gemma 2/3's fused ops (kernels/ops.py `gemma_*`, `gelu_tanh_and_mul`, `linear_gelu_and_mul`,
`soft_cap`): the reference twins against transformers' GemmaRMSNorm / their definitions, the Triton
kernels against the twins (CPU: the interpreter in fp32 and fp16; `gpu`: bf16 on CUDA), and whole
tiny Gemma 2 / Gemma 3 models on the Triton bundle against transformers (the restructured layer:
the residual stream flowing through the fused sandwich steps, random (1 + w) norm weights). The
q/k head norms' kernel (`gemma_qk_norm`, shared with Qwen3): test_head_norm.py."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import CASES, CPU_CASES, GPU_CASES, skip_without, tol_for

from kernels import reference
from tests.worker.worker_testlib import randomize_norms_and_biases

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-6


def _hf_gemma_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma3RMSNorm.forward, written out (the numerics every op here must keep)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(w.float())
    return norm.to(x.dtype)(x)


def _make(
    *shape: int, gen: torch.Generator, device: str, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


# --- reference twins ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_gemma_norms_are_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    y, residual, x = (_make(3, 40, gen=gen, device="cpu", dtype=dtype, scale=3.0) for _ in range(3))
    w1, w2 = (_make(40, gen=gen, device="cpu", dtype=dtype, scale=0.5) for _ in range(2))
    assert torch.equal(reference.gemma_rms_norm(x, w1, EPS), _hf_gemma_norm(x, w1, EPS))
    normed, h = reference.gemma_add_rms_norm(y, residual, w1, w2, EPS)
    assert torch.equal(h, residual + _hf_gemma_norm(y, w1, EPS))
    assert torch.equal(normed, _hf_gemma_norm(h, w2, EPS))
    normed, h = reference.gemma_scale_rms_norm(x, 40**0.5, w1, EPS)
    assert torch.equal(h, x * torch.tensor(40**0.5, dtype=dtype))
    assert torch.equal(normed, _hf_gemma_norm(h, w1, EPS))
    q, k = (
        _make(3, 4, 16, gen=gen, device="cpu", dtype=dtype),
        _make(3, 2, 16, gen=gen, device="cpu", dtype=dtype),
    )
    wq, wk = _make(16, gen=gen, device="cpu", dtype=dtype), _make(16, gen=gen, device="cpu", dtype=dtype)
    qn, kn = reference.gemma_qk_norm(q, k, wq, wk, EPS)
    assert torch.equal(qn, _hf_gemma_norm(q, wq, EPS)) and torch.equal(kn, _hf_gemma_norm(k, wk, EPS))


def test_reference_gelu_and_soft_cap() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2 * 24, generator=gen) * 4
    assert torch.equal(reference.gelu_tanh_and_mul(x), F.gelu(x[:, :24], approximate="tanh") * x[:, 24:])
    w = torch.randn(2 * 24, 32, generator=gen, dtype=torch.float64) * 0.2
    xs = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    gate_up = xs @ w.T
    expected = F.gelu(gate_up[:, :24], approximate="tanh") * gate_up[:, 24:]
    got = reference.linear_gelu_and_mul(xs.float(), w.float(), None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=2e-6)  # fp32 math, rounded once
    torch.testing.assert_close(reference.soft_cap(x, 30.0), torch.tanh(x / 30.0) * 30.0)


# --- Triton kernels against the twins ------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_norm():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    return importlib.import_module("kernels.triton.gemma_norm")


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    tol = tol_for(out.dtype)
    torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol)


# (T, H): one row, a non-power-of-two hidden size, several rows of Gemma-3-12B's hidden size
NORM_SHAPES = [(1, 64), (3, 200), (5, 3840)]


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("num_tokens", "hidden"), NORM_SHAPES)
def test_triton_gemma_norms(
    gemma_norm, device: str, dtype: torch.dtype, num_tokens: int, hidden: int
) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(num_tokens * 31 + hidden)

    def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return _make(*shape, gen=gen, device=device, dtype=dtype, scale=scale)

    # residual-stream-like values (large), a block output, weights around 0 (scale 1 + w)
    y, residual, x = (
        make(num_tokens, hidden, scale=2.0),
        make(num_tokens, hidden, scale=20.0),
        make(num_tokens, hidden),
    )
    w_post, w_pre = make(hidden, scale=0.5), make(hidden, scale=0.5)
    _assert_close(gemma_norm.gemma_rms_norm(x, w_pre, EPS), reference.gemma_rms_norm(x, w_pre, EPS))
    before = residual.clone()
    got = gemma_norm.gemma_add_rms_norm(y, residual, w_post, w_pre, EPS)
    assert torch.equal(residual, before), "the sandwich step must not write its residual input"
    for out, expected in zip(got, reference.gemma_add_rms_norm(y, residual, w_post, w_pre, EPS), strict=True):
        _assert_close(out, expected)
    scale = float(hidden) ** 0.5
    got = gemma_norm.gemma_scale_rms_norm(x, scale, w_pre, EPS)
    h_ref = reference.gemma_scale_rms_norm(x, scale, w_pre, EPS)[1]
    assert torch.equal(got[1], h_ref), "the scaled embedding is one rounded product, as transformers'"
    _assert_close(got[0], reference.gemma_rms_norm(h_ref, w_pre, EPS))


@pytest.mark.parametrize(("device", "dtype"), CPU_CASES[:1] + GPU_CASES)
def test_triton_gemma_ops_empty(gemma_norm, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    x, w = torch.empty(0, 32, device=device, dtype=dtype), torch.zeros(32, device=device, dtype=dtype)
    assert gemma_norm.gemma_add_rms_norm(x, x, w, w, EPS)[1].shape == (0, 32)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("num_tokens", "inter"), [(1, 96), (3, 1500), (2, 7680)])
def test_triton_gelu_tanh_and_mul(device: str, dtype: torch.dtype, num_tokens: int, inter: int) -> None:
    pytest.importorskip("triton")
    from kernels.triton.gelu_and_mul import gelu_tanh_and_mul

    skip_without(device)
    gen = torch.Generator().manual_seed(inter)
    # gate values far out on both sides too (the activation's limits: 0 and the identity)
    gate_up = _make(num_tokens, 2 * inter, gen=gen, device=device, dtype=dtype, scale=4.0)
    gate_up[0, :4] = torch.tensor([-60.0, -9.0, 9.0, 60.0])
    _assert_close(gelu_tanh_and_mul(gate_up), reference.gelu_tanh_and_mul(gate_up))
    wide = _make(num_tokens, 2 * inter + 8, gen=gen, device=device, dtype=dtype)[
        :, : 2 * inter
    ]  # strided rows
    _assert_close(gelu_tanh_and_mul(wide), reference.gelu_tanh_and_mul(wide))


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_triton_soft_cap(device: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from kernels.triton.soft_cap import soft_cap

    skip_without(device)
    gen = torch.Generator().manual_seed(2)
    logits = _make(2, 5000, gen=gen, device=device, dtype=dtype, scale=20.0)
    logits[0, :3] = torch.tensor([-1e4, 0.0, 1e4])  # saturates to -cap / cap, no NaN
    got = soft_cap(logits, 30.0)
    tol = tol_for(dtype)
    torch.testing.assert_close(got, reference.soft_cap(logits, 30.0), atol=tol * 30, rtol=tol)
    assert got[0, 0].item() == -30.0 and got[0, 2].item() == 30.0


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("num_tokens", [1, 3, 20])
def test_skinny_linear_gelu_and_mul(device: str, dtype: torch.dtype, num_tokens: int) -> None:
    """The skinny GEMM's GELU(tanh) epilogue against the twin (I = 40 leaves the last output
    block partial), and the bundle op (untuned: the GEMM then the GELU kernel)."""
    pytest.importorskip("triton")
    skinny = importlib.import_module("kernels.triton.skinny_gemm")
    skip_without(device)
    gen = torch.Generator().manual_seed(num_tokens)
    x = _make(num_tokens, 96, gen=gen, device=device, dtype=dtype, scale=2.0)
    w = _make(80, 96, gen=gen, device=device, dtype=dtype, scale=0.1)
    expected = reference.linear_gelu_and_mul(x, w, None)
    tol = tol_for(dtype)
    torch.testing.assert_close(skinny.linear_gelu_and_mul(x, w, None), expected, atol=tol * 8, rtol=tol * 4)
    if num_tokens <= skinny.MAX_ROWS:
        for config in (skinny.SkinnyConfig(32, 64, 4, 2), skinny.SkinnyConfig(16, 64, 4, 2)):
            out = skinny.skinny_gemm(x, w, None, config, gated=True, activation="gelu_tanh")
            torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol * 2)


# --- whole tiny Gemma models on the Triton bundle -------------------------------------------------


def _tiny_gemma(family: str, seed: int) -> Any:
    """head_dim 32 (the Triton attention's range), random (1 + w) norm weights (transformers
    initialises w to 0, which would hide a weight applied as w or twice)."""
    import transformers as tf

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=3,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
        query_pre_attn_scalar=32,
        sliding_window=4,
    )
    if family == "gemma2":
        cfg: Any = tf.Gemma2Config(**common, attn_logit_softcapping=1.5, final_logit_softcapping=4.0)
        hf = tf.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
    else:
        cfg = tf.Gemma3TextConfig(
            **common, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
        )
        hf = tf.Gemma3ForCausalLM(cfg)
    randomize_norms_and_biases(hf, seed)
    return hf.eval()


def _model_logits(
    model: Any, prompt: list[int], block_size: int = 4, decode_mode: Any = None
) -> torch.Tensor:
    """Logits [len(prompt), vocab] fp32 of a prefill of prompt[:-1] and a decode step of prompt[-1]
    (the model's own rope tables: Gemma 3's local layers have theirs); the decode step's forward
    runs inside `decode_mode` (a dispatch mode) if given."""
    from services.worker.layers.attention import AttentionMetadata

    cfg = model.config
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    num_tokens, num_blocks = len(prompt), -(-len(prompt) // block_size)
    kv = torch.zeros(
        cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, device=device, dtype=dtype
    )
    for i, attn in enumerate(model.attention_layers()):
        attn.kv_cache = kv[i]
    cos_sin = model.build_rope_cache(num_tokens, dtype, device)
    out = []
    for start, end in ((0, num_tokens - 1), (num_tokens - 1, num_tokens)):
        positions = torch.arange(start, end, device=device)

        def int32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=positions.clone(),
            block_tables=int32(list(range(num_blocks)))[None, :],
            cu_seqlens_q=int32([0, end - start]),
            seq_lens=int32([end]),
            max_seqlen_q=end - start,
            cos_sin_cache=cos_sin,
        )
        ids = torch.tensor(prompt[start:end], device=device)
        with torch.inference_mode():
            if decode_mode is not None and end - start == 1:
                with decode_mode:
                    out.append(model.compute_logits(model(ids, meta)))
            else:
                out.append(model.compute_logits(model(ids, meta)))
    return torch.cat(out)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_triton_bundle_runs_gemma(gemma_norm, family: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Triton bundle's fused Gemma ops (interpreter) inside the model give transformers'
    logits: a prefill and a decode step past the sliding window."""
    from kernels.triton import TRITON_OPS
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    hf = _tiny_gemma(family, seed=11)
    hf.save_pretrained(str(tmp_path))
    cfg = load_model_config(str(tmp_path))
    model = build_model(cfg, TRITON_OPS, torch.device("cpu"), torch.float32, "auto")
    prompt = [1, 17, 99, 5, 64, 3, 120, 42, 8, 77]
    got = _model_logits(model, prompt)
    with torch.inference_mode():
        torch.testing.assert_close(got, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)


# PyTorch's elementwise and reduction ops: each one a kernel launch of its own on the GPU.
_EAGER_MATH = ("aten.add.", "aten.sub.", "aten.mul.", "aten.div.", "aten.pow.", "aten.mean.", "aten.rsqrt.")
_EAGER_MATH += ("aten.gelu.", "aten.tanh.")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_decode_step_runs_no_eager_math(gemma_norm, family: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On the Triton bundle a Gemma decode step's norms, residual adds, GELU, embedding scale and
    soft-cap are all inside the fused ops: no PyTorch elementwise or reduction op runs between the
    GEMMs and the attention (before, every (1 + w) norm was ~10 of them: x.float(), pow, mean, add,
    rsqrt, mul, w.float(), 1 + w, mul, cast; six norms a layer)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels.triton import TRITON_OPS
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    hf = _tiny_gemma(family, seed=3)
    hf.save_pretrained(str(tmp_path))
    model = build_model(
        load_model_config(str(tmp_path)), TRITON_OPS, torch.device("cpu"), torch.float32, "auto"
    )
    counter = CountOps()
    _model_logits(model, [1, 17, 99, 5, 64, 3], decode_mode=counter)
    assert counter.ops["aten.linear.default"] >= 4 * 3, counter.ops  # the mode saw the step
    eager = {op: n for op, n in counter.ops.items() if op.startswith(_EAGER_MATH)}
    assert not eager, eager


@pytest.mark.gpu
def test_tune_linear_times_the_gelu_epilogue_on_gpu() -> None:
    """On CUDA: the tuner times the GELU-epilogue kernel against the GEMM + GELU kernel for a
    Gemma gate/up weight, and `linear_gelu_and_mul` matches the twin whichever it chose."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kernel_cases import rel_err

    from kernels.triton.skinny_gemm import linear_gelu_and_mul, tune_linear

    weights = [torch.randn(6144, 1024, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(4)]
    lines = tune_linear(weights, None, 1, "test", gated=True, activation="gelu_tanh")
    print("\n".join(lines))
    assert lines[-1].startswith("linear+gelu test 6144x1024 rows=1: GEMM + GELU"), lines[-1]
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    expected = reference.linear_gelu_and_mul(x, weights[2], None).float()
    assert rel_err(linear_gelu_and_mul(x, weights[2], None), expected) < 1e-2


@pytest.mark.gpu
def test_gemma3_decode_kernels_per_layer_gpu(tmp_path: Path) -> None:
    """On CUDA (bf16, Gemma-3-1B's layer shape, untuned GEMMs): a decode step launches at most 11
    kernels a layer (qkv GEMM, q/k norm, attention, o_proj, sandwich step, gate/up GEMM, GELU,
    down GEMM and a split-K reduction where cuBLAS splits, sandwich step); the eager (1 + w) norms
    made it about 70. Counted as the difference between a 4-layer and a 2-layer model."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import transformers as tf
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kernels.triton import TRITON_OPS
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    def decode_kernels(num_layers: int) -> int:
        path = tmp_path / str(num_layers)
        tf.Gemma3TextConfig(
            hidden_size=1152,
            intermediate_size=6912,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            num_hidden_layers=num_layers,
            vocab_size=1024,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
            architectures=["Gemma3ForCausalLM"],
        ).save_pretrained(str(path))
        cfg = load_model_config(str(path))
        model = build_model(cfg, TRITON_OPS, torch.device("cuda"), torch.bfloat16, "dummy")
        prompt = list(range(1, 12))
        _model_logits(model, prompt, block_size=16)  # compiles the kernels
        prof = profile(activities=[ProfilerActivity.CUDA])

        @contextlib.contextmanager
        def profiled() -> Iterator[None]:
            with prof:
                yield
                torch.cuda.synchronize()

        _model_logits(model, prompt, block_size=16, decode_mode=profiled())  # the decode step only
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)

    per_layer = (decode_kernels(4) - decode_kernels(2)) / 2
    print(f"kernels per Gemma 3 layer in a decode step: {per_layer}")
    assert per_layer <= 11, per_layer
