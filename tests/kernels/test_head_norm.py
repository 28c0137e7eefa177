"""The q/k head norms (kernels/triton/head_norm.py): Gemma 3's (1 + w) `gemma_qk_norm` and Qwen3's
plain-weight `qk_rms_norm` (with a folded input norm's raw stream too), all heads of q and k in one
launch, against their twins in kernels/reference.py (CPU: the interpreter in fp32 and fp16; `gpu`:
bf16 on CUDA)."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_cases import CASES, CPU_CASES, GPU_CASES, skip_without, tol_for

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-6


@pytest.fixture(scope="module")
def head_norm():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    return importlib.import_module("kernels.triton.head_norm")


def _make(
    *shape: int, gen: torch.Generator, device: str, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    tol = tol_for(out.dtype)
    torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(
    ("num_tokens", "num_q", "num_kv", "head_dim"), [(1, 8, 4, 256), (3, 4, 1, 48), (2, 2, 2, 16)]
)
def test_triton_gemma_qk_norm(  # type: ignore[no-untyped-def]
    head_norm, device: str, dtype: torch.dtype, num_tokens: int, num_q: int, num_kv: int, head_dim: int
) -> None:
    """All q and k heads in one launch, read from views of a qkv projection (token stride = qkv width)."""
    skip_without(device)
    gen = torch.Generator().manual_seed(num_q * 7 + head_dim)
    q_size, kv_size = num_q * head_dim, num_kv * head_dim
    qkv = _make(num_tokens, q_size + 2 * kv_size, gen=gen, device=device, dtype=dtype, scale=3.0)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.reshape(num_tokens, num_q, head_dim), k.reshape(num_tokens, num_kv, head_dim)
    wq = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5)
    wk = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5)
    got = head_norm.gemma_qk_norm(q, k, wq, wk, EPS)
    for out, expected in zip(got, reference.gemma_qk_norm(q, k, wq, wk, EPS), strict=True):
        _assert_close(out, expected)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("num_tokens", "num_q", "num_kv", "head_dim"), [(1, 32, 4, 128), (3, 4, 1, 48)])
def test_triton_qk_rms_norm_is_two_rms_norms(  # type: ignore[no-untyped-def]
    head_norm, device: str, dtype: torch.dtype, num_tokens: int, num_q: int, num_kv: int, head_dim: int
) -> None:
    """Qwen3's q/k norms in one launch (`qk_rms_norm`: the q/k head norm kernel with plain weights) equal
    the two rms_norm calls they replace (HF's rounding: the normed row in the input dtype, then
    times the weight), read from views of a qkv projection; Qwen3-30B-A3B's 32 q and 4 kv heads."""
    skip_without(device)
    gen = torch.Generator().manual_seed(num_q * 5 + head_dim)
    q_size, kv_size = num_q * head_dim, num_kv * head_dim
    qkv = _make(num_tokens, q_size + 2 * kv_size, gen=gen, device=device, dtype=dtype, scale=3.0)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.reshape(num_tokens, num_q, head_dim), k.reshape(num_tokens, num_kv, head_dim)
    wq = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5) + 1.0
    wk = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5) + 1.0
    got = head_norm.qk_rms_norm(q, k, wq, wk, EPS)
    want = reference.qk_rms_norm(q, k, wq, wk, EPS)
    assert torch.equal(want[0], reference.rms_norm(q, wq, EPS))
    for out, expected in zip(got, want, strict=True):
        assert out.shape == expected.shape and out.is_contiguous()
        _assert_close(out, expected)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_triton_qk_rms_norm_of_a_folded_input_norm(head_norm, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """Folded input norm (Qwen3-MoE decode): q, k projected from the raw stream h are rms(h) times
    the normalised input's; `qk_rms_norm(..., rms_input=h)` returns rms_norm(s * q) / s (s = 1/rms(h)),
    which the attention kernel's own s scale turns into the unfolded layer's normed q and k."""
    skip_without(device)
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_q, num_kv, head_dim, hidden = 3, 4, 2, 32, 2048 + 96  # (h in two tiles)
    to = {"device": device, "dtype": dtype}
    h = (torch.randn(num_tokens, hidden, generator=gen) * torch.tensor([0.3, 5.0, 60.0])[:, None]).to(**to)
    s = torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + EPS)[:, :, None]  # [T, 1, 1]
    q_normed_in = torch.randn(num_tokens, num_q, head_dim, generator=gen).to(**to)
    k_normed_in = torch.randn(num_tokens, num_kv, head_dim, generator=gen).to(**to)
    q_raw, k_raw = (q_normed_in.double() / s).to(dtype), (k_normed_in.double() / s).to(dtype)
    wq = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5) + 1.0
    wk = _make(head_dim, gen=gen, device=device, dtype=dtype, scale=0.5) + 1.0
    want = reference.qk_rms_norm(q_normed_in, k_normed_in, wq, wk, EPS)
    twin = reference.qk_rms_norm(q_raw, k_raw, wq, wk, EPS, rms_input=h, rms_eps=EPS)
    got = head_norm.qk_rms_norm(q_raw, k_raw, wq, wk, EPS, rms_input=h, rms_eps=EPS)
    for out in (*twin, *got):
        assert out.dtype == dtype
    for pair in (twin, got):
        for out, expected in zip(pair, want, strict=True):
            _assert_close((out.double() * s).to(dtype), expected)


@pytest.mark.parametrize(("device", "dtype"), CPU_CASES[:1] + GPU_CASES)
def test_triton_qk_norms_empty(head_norm, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    w = torch.zeros(32, device=device, dtype=dtype)
    q = torch.empty(0, 2, 32, device=device, dtype=dtype)
    assert head_norm.gemma_qk_norm(q, q, w, w, EPS)[0].shape == (0, 2, 32)
