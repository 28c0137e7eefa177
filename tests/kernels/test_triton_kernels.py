"""Each Triton kernel against its PyTorch reference twin, on fresh random inputs.

On a machine without CUDA the kernels run on Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1) in fp32 and fp16 (bf16 tl.dot is wrong in the interpreter); the same tests
run on CUDA in bf16 under the `gpu` marker, with longer contexts that exercise the KV splits.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import CASES, CPU_CASES, GPU_CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import get_ops, reference
from kernels.triton.arrival_counters import arrival_counters
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (num_q_heads, num_kv_heads, head_dim, block_size): GQA ratios 1, 4 and 7.
SHAPES = [(4, 4, 64, 16), (8, 2, 128, 32), (14, 2, 64, 16)]
GPU_ONLY_SHAPES = [(32, 8, 128, 16), (14, 2, 64, 32), (12, 2, 128, 16)]


@pytest.fixture(scope="module")
def triton_ops():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS


def _shapes(device: str) -> list[tuple[int, int, int, int]]:
    return SHAPES + (GPU_ONLY_SHAPES if device == "cuda" else [])


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_prefill_attention_with_cached_prefix(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(1)
    for num_q_heads, num_kv_heads, head_dim, block_size in _shapes(device):
        # Fresh prompts, prompts crossing block boundaries with a cached prefix, and decode rows mixed in.
        seqs = [(0, 37), (2 * block_size - 3, 9), (40, 1), (0, 1), (block_size, block_size + 3)]
        if device == "cuda":
            seqs += [(0, 1000), (3000, 257), (777, 1)]
        batch = make_paged_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen)
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
        scale = 1.0 / math.sqrt(head_dim)
        out = triton_ops.paged_attention(*args, scale, batch.max_seqlen_q)
        ref = reference.paged_attention(*args, scale, batch.max_seqlen_q)
        err = rel_err(out, ref)
        assert err < tol_for(dtype), (num_q_heads, num_kv_heads, head_dim, block_size, err)


# (fp32 on the interpreter: both kernels run twice per shape there, and fp16 adds no path of its own)
@pytest.mark.parametrize(("device", "dtype"), [CPU_CASES[0], *GPU_CASES])
def test_mixed_step_decode_rows_take_the_decode_kernel(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """A step with decodes first and prompt chunks after (`num_decode_rows`): the decode kernel
    over the first sequences and the prefill kernel over the rest, into one output, equal to the
    reference, and to the prefill kernel alone over the whole batch."""
    skip_without(device)
    gen = torch.Generator().manual_seed(7)
    for num_q_heads, num_kv_heads, head_dim, block_size in _shapes(device):
        decodes = [(40, 1), (2 * block_size - 1, 1), (0, 1), (3 * block_size, 1)]
        prompts = [(0, 37), (block_size + 5, 2 * block_size + 1)]
        if device == "cuda":
            decodes += [(1500, 1), (4000, 1)]
            prompts += [(0, 700), (2000, 300)]
        batch = make_paged_batch(
            decodes + prompts, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
        )
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
        scale = 1.0 / math.sqrt(head_dim)
        out = triton_ops.paged_attention(*args, scale, batch.max_seqlen_q, num_decode_rows=len(decodes))
        ref = reference.paged_attention(*args, scale, batch.max_seqlen_q)
        whole = triton_ops.paged_attention(*args, scale, batch.max_seqlen_q)
        for got in (out, whole):
            err = rel_err(got, ref)
            assert err < tol_for(dtype), (num_q_heads, num_kv_heads, head_dim, block_size, err)
        # decode rows and prompt rows each match the other kernel's answer for them
        assert rel_err(out[: len(decodes)], whole[: len(decodes)]) < tol_for(dtype)
        torch.testing.assert_close(out[len(decodes) :], whole[len(decodes) :], rtol=0, atol=0)
        # into a given buffer's first rows (the prefill graphs' output buffer, prefill_graph.py): the
        # same values, and rows past the step's untouched
        buffer = torch.full((batch.q.shape[0] + 3, *batch.q.shape[1:]), 7.0, dtype=dtype, device=device)
        into = triton_ops.paged_attention(
            *args, scale, batch.max_seqlen_q, num_decode_rows=len(decodes), out=buffer[: batch.q.shape[0]]
        )
        assert into.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer[: batch.q.shape[0]], out, rtol=0, atol=0)
        assert bool((buffer[batch.q.shape[0] :] == 7.0).all())


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_decode_attention_splits_and_padding(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(2)
    for num_q_heads, num_kv_heads, head_dim, block_size in _shapes(device):
        lens = [1, 17, 70, block_size, 3 * block_size + 1]
        if device == "cuda":
            lens += [4000, 33000, 513]
        seqs = [(n - 1, 1) for n in lens]
        batch = make_paged_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen)
        # CUDA-graph padding: two trailing entries with no query token and seq_len 0, one extra q row.
        q = torch.cat([batch.q, torch.randn_like(batch.q[:1])])
        cu = torch.cat([batch.cu_seqlens_q, batch.cu_seqlens_q[-1:], batch.cu_seqlens_q[-1:]])
        seq_lens = torch.cat([batch.seq_lens, torch.zeros(2, dtype=torch.int32, device=device)])
        tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:2])])
        scale = 1.0 / math.sqrt(head_dim)
        out = triton_ops.paged_attention(q, batch.kv_cache, tables, cu, seq_lens, scale, 1)
        ref = reference.paged_attention(q, batch.kv_cache, tables, cu, seq_lens, scale, 1)
        rows = int(batch.cu_seqlens_q[-1])  # the extra padding row is left unwritten by the kernel
        err = rel_err(out[:rows], ref[:rows])
        assert err < tol_for(dtype), (num_q_heads, num_kv_heads, head_dim, block_size, err)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_decode_attention_in_kernel_merge(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """Forced split counts (the CPU's default cap is 1 split): the last-arriving program merges the
    splits in the same launch and resets its arrival counter, so a second launch gives equal output."""
    skip_without(device)
    from kernels.triton import decode_attention as da

    gen = torch.Generator().manual_seed(5)
    # The interpreter runs every program of the grid in turn: one GQA-7 shape and short contexts there.
    shapes = SHAPES + GPU_ONLY_SHAPES if device == "cuda" else [(14, 2, 64, 16)]
    for num_q_heads, num_kv_heads, head_dim, block_size in shapes:
        lens = [1, 20, 70, 3 * block_size + 1]
        if device == "cuda":
            lens += [200, 5000, 2049]
        batch = make_paged_batch(
            [(n - 1, 1) for n in lens], num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
        )
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
        scale = 1.0 / math.sqrt(head_dim)
        ref = reference.paged_attention(*args, scale, 1)
        for max_splits in (1, 3, 16) if device == "cuda" else (3, 16):
            out = da.decode_attention(*args, scale, max_splits=max_splits)
            again = da.decode_attention(*args, scale, max_splits=max_splits)
            err = rel_err(out, ref)
            assert err < tol_for(dtype), (num_q_heads, num_kv_heads, head_dim, max_splits, err)
            assert torch.equal(out, again), "a second launch must see reset counters"
        counters = arrival_counters("decode attention", batch.q.device, 1)  # the buffer the launches used
        assert int(counters.abs().sum()) == 0, "arrival counters left non-zero"


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_rotary_write_kv_cache(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """The fused rotary + KV write equals `rotary` then `write_kv_cache` (bitwise on the cache)."""
    skip_without(device)
    for num_q_heads, num_kv_heads, head_dim in [(4, 4, 64), (14, 2, 64), (32, 8, 128)]:
        cos_sin = reference.build_rope_cache(head_dim, 4096, 10000.0, None, dtype, device)
        tokens, num_blocks, block_size = 23, 5, 16
        qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
        q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
        positions = torch.randint(0, 4096, (tokens,), device=device)
        slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
        slots[::5] = -1  # padding rows write nothing
        cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
        expected = cache.clone()
        q_ref = reference.rotary_write_kv_cache(q, k, v, expected, slots, positions, cos_sin)
        q_out = triton_ops.rotary_write_kv_cache(q, k, v, cache, slots, positions, cos_sin)
        tol = tol_for(dtype)
        torch.testing.assert_close(q_out, q_ref, atol=tol * 4, rtol=tol)
        # the rotated q into a given buffer (the prefill graphs' query buffer): the same values
        buffer = torch.zeros(tokens + 4, num_q_heads, head_dim, dtype=dtype, device=device)
        again = cache.clone()
        into = triton_ops.rotary_write_kv_cache(
            q, k, v, again, slots, positions, cos_sin, out=buffer[:tokens]
        )
        assert into.data_ptr() == buffer.data_ptr() and bool((buffer[tokens:] == 0).all())
        torch.testing.assert_close(buffer[:tokens], q_out, rtol=0, atol=0)
        torch.testing.assert_close(cache, expected, atol=tol * 4, rtol=tol)
        untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
        untouched[slots[slots >= 0].cpu()] = False
        flat = cache.view(2, -1, num_kv_heads, head_dim)
        assert torch.equal(
            flat[:, untouched.to(device)],
            expected.view(2, -1, num_kv_heads, head_dim)[:, untouched.to(device)],
        )


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_write_kv_cache(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    num_blocks, block_size, heads, dim, tokens = 9, 16, 2, 64, 40
    # K/V as strided views of a fused qkv row, the way the model produces them.
    qkv = torch.randn(tokens, (4 + 2 * heads) * dim, device=device).to(dtype)
    key = qkv[:, 4 * dim : (4 + heads) * dim].view(tokens, heads, dim)
    value = qkv[:, (4 + heads) * dim :].view(tokens, heads, dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
    slots[::7] = -1
    cache = torch.randn(2, num_blocks, block_size, heads, dim, device=device).to(dtype)
    expected = cache.clone()
    reference.write_kv_cache(key, value, expected, slots)
    triton_ops.write_kv_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("hidden", [64, 896, 1000])
def test_norms(triton_ops, device: str, dtype: torch.dtype, hidden: int) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    x = torch.randn(13, hidden, device=device).to(dtype)
    residual = torch.randn(13, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    tol = tol_for(dtype)
    torch.testing.assert_close(
        triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), atol=tol * 4, rtol=tol
    )
    normed, new_res = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_res = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref_normed, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 4, 64), (14, 2, 64), (32, 8, 128)])
def test_rotary(
    triton_ops, device: str, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cache = reference.build_rope_cache(head_dim, 20000, 500000.0, scaling, dtype, device)
    tokens = 11
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(
        tokens, num_kv_heads, head_dim
    )
    positions = torch.randint(0, 20000, (tokens,), device=device)
    q_before = q.clone()
    q_out, k_out = triton_ops.rotary(q, k, positions, cache)
    q_ref, k_ref = reference.rotary(q, k, positions, cache)
    tol = tol_for(dtype)
    torch.testing.assert_close(q_out, q_ref, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(k_out, k_ref, atol=tol * 4, rtol=tol)
    assert torch.equal(q, q_before), "rotary must not modify its inputs"


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_silu_and_mul(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    x = torch.randn(7, 2 * 1500, device=device).to(dtype)
    tol = tol_for(dtype)
    torch.testing.assert_close(triton_ops.silu_and_mul(x), reference.silu_and_mul(x), atol=tol * 4, rtol=tol)


def test_get_ops_picks_triton_on_cuda_only() -> None:
    assert get_ops("auto", "cpu").name == "reference"
    pytest.importorskip("triton")
    assert get_ops("triton", "cpu").name == "triton"  # forced: the interpreter or an explicit choice


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_tiny_head_dim_falls_back_to_reference(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(3)
    batch = make_paged_batch([(5, 7), (9, 1)], 8, 4, 8, 16, dtype, device, gen)  # stories260K: head_dim 8
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, 8**-0.5, 7)
    torch.testing.assert_close(triton_ops.paged_attention(*args), reference.paged_attention(*args))


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_skinny_gemm(device: str, dtype: torch.dtype) -> None:
    """Every candidate config of the decode-sized GEMM against F.linear (odd N and K exercise the
    masks), with and without bias."""
    skip_without(device)
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from kernels.triton.skinny_gemm import CANDIDATES, skinny_gemm

    gen = torch.Generator().manual_seed(6)
    n, k = 200, 300
    weight = torch.randn(n, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    configs = CANDIDATES if device == "cuda" else CANDIDATES[:2]
    for rows in (1, 3, 8):
        x = torch.randn(rows, k, generator=gen).to(device, dtype)
        for b in (None, bias):
            ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
            for config in configs:
                out = skinny_gemm(x, weight, b, config)
                assert out.shape == (rows, n) and out.dtype == dtype
                err = rel_err(out, ref)
                # fp32 on a GPU: tl.dot runs TF32 (why tune_linear leaves fp32 on cuBLAS)
                tol = 2e-3 if (dtype == torch.float32 and device == "cuda") else tol_for(dtype)
                assert err < tol, (rows, config, b is None, err)
            # Signalling the next kernel early changes when it launches, never the result.
            early = skinny_gemm(x, weight, b, configs[0], early_signal=True)
            assert torch.equal(early, skinny_gemm(x, weight, b, configs[0])), rows


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_argmax(device: str, dtype: torch.dtype) -> None:
    """The two-launch argmax equals torch.argmax, ties included (first index wins), for vocabularies
    that are and are not a multiple of the chunk."""
    skip_without(device)
    pytest.importorskip("triton")
    from kernels.triton.argmax import BLOCK, argmax

    gen = torch.Generator().manual_seed(8)
    for vocab in (7, BLOCK, 3 * BLOCK + 5):
        logits = torch.randn(3, vocab, generator=gen).to(device, dtype)
        logits[1] = 0.0  # all tied: index 0
        if vocab > BLOCK:
            logits[2, vocab - 2] = logits[2, BLOCK + 1] = 100.0  # a tie across chunks
        assert torch.equal(argmax(logits), logits.argmax(dim=-1)), vocab


def test_linear_without_tuning_is_f_linear() -> None:
    """No measured choice (the CPU, fp32, or an untuned shape): `linear` is exactly F.linear."""
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from kernels.triton.skinny_gemm import linear, tune_linear

    x, w, b = torch.randn(2, 24), torch.randn(40, 24), torch.randn(40)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert tune_linear([w], b) == []  # CPU: nothing timed, nothing chosen


@pytest.mark.gpu
def test_tune_linear_on_gpu_picks_a_correct_kernel() -> None:
    """On CUDA: the tuner times cuBLAS and every config for 1, 2, 4, 8 rows, reports each, and
    `linear` then matches F.linear whichever it chose."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import torch.nn.functional as F

    from kernels.triton.skinny_gemm import chosen, linear, tune_linear

    weights = [torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    lines = tune_linear(weights, bias, 8, "test", gated=True)
    print("\n".join(lines))
    assert len(lines) == 5 and all("cuBLAS" in line for line in lines[:4])
    assert lines[4].startswith("linear+silu test 3072x1024 rows=1: GEMM + SiLU"), lines[4]
    from kernels import reference
    from kernels.triton.skinny_gemm import linear_silu_and_mul

    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    for rms_eps in (None, 1e-5):  # fused or not (whichever won), against the twin
        expected = reference.linear_silu_and_mul(x, weights[2], bias, rms_eps).float()
        assert rel_err(linear_silu_and_mul(x, weights[2], bias, rms_eps), expected) < 1e-2, rms_eps
    for rows in (1, 3, 8):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), weights[1].float(), bias.float())
        assert rel_err(linear(x, weights[1], bias), ref) < 1e-2, (
            rows,
            chosen(3072, 1024, torch.bfloat16, True, rows),
        )


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_row_topk_is_a_stable_descending_sort_s_first_k(device: str, dtype: torch.dtype) -> None:
    """row_topk equals the first k of a stable descending sort (equal values in index order), for
    vocabularies shorter than, equal to and not a multiple of the chunk, ties within and across
    chunks, -inf runs longer than a chunk's share, and k from 1 to past one chunk's tail."""
    skip_without(device)
    pytest.importorskip("triton")
    from kernels.triton.row_topk import BLOCK, row_topk

    gen = torch.Generator().manual_seed(11)
    for vocab, k in ((5, 5), (37, 8), (BLOCK, 3), (2 * BLOCK + 7, 16), (2 * BLOCK + 7, 1)):
        x = torch.randn(4, vocab, generator=gen).to(dtype)
        x[1] = 0.5  # all tied: the first k indices
        x[2, : vocab // 2] = -torch.inf  # a masked half (banned tokens)
        if vocab > BLOCK:  # equal values in several chunks, with the k-th place among them
            x[3, [3, BLOCK + 1, BLOCK + 2, vocab - 1]] = 50.0
            x[3, [7, 2 * BLOCK]] = 60.0
        x = x.to(device)
        values, ids = row_topk(x, k)
        want_values, want_ids = x.float().sort(dim=-1, descending=True, stable=True)
        assert torch.equal(ids.cpu(), want_ids[:, :k].cpu()), (vocab, k)
        assert torch.equal(values.cpu(), want_values[:, :k].cpu()), (vocab, k)


def test_beam_kernels_compile_for_hopper() -> None:
    """The interpreter runs row_topk's, beam_candidates', beam_topk_candidates' and beam_ahead's kernels as Python; this compiles them as the GPU does (to a
    cubin for sm_90, in a process without TRITON_INTERPRET), so a construct the compiler rejects
    fails here and not in a beam search on the device."""
    pytest.importorskip("triton")
    script = """
import importlib
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
m = importlib.import_module("kernels.triton.row_topk")
c = importlib.import_module("kernels.triton.beam_candidates")
a = importlib.import_module("kernels.triton.beam_ahead")
o = importlib.import_module("kernels.triton.beam_topk_candidates")
ints = {"vocab": "i32", "num_chunks": "i32"}
for fn, sig, consts in [
    (m._topk_chunks_kernel, {"x_ptr": "*fp32", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", **ints,
     "stride_x": "i32", "K": "constexpr", "BLOCK": "constexpr"}, {"K": 8, "BLOCK": 4096}),
    (m._topk_merge_kernel, {"part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "val_ptr": "*fp32",
     "idx_ptr": "*i64", "vocab": "i32", "num_candidates": "i32", "K": "constexpr", "C_PAD": "constexpr"},
     {"K": 8, "C_PAD": 512}),
    (c._beam_candidates_kernel, {"values_ptr": "*fp32", "ids_ptr": "*i64", "scores_ptr": "*fp64",
     "stops_ptr": "*i64", "table_ptr": "*fp64", "parents_ptr": "*i64", "tokens_ptr": "*i64",
     "totals_ptr": "*fp64", "stride_v": "i32", "stride_i": "i32", "num_stops": "i32", "W": "constexpr",
     "PB": "constexpr", "KEEP": "constexpr", "C_PAD": "constexpr", "S_PAD": "constexpr",
     "W_PAD": "constexpr"}, {"W": 4, "PB": 8, "KEEP": 8, "C_PAD": 32, "S_PAD": 16, "W_PAD": 16}),
    (o._beam_topk_candidates_kernel, {"x_ptr": "*fp32", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32",
     "row_counter_ptr": "*i32", "group_counter_ptr": "*i32", "val_ptr": "*fp32", "idx_ptr": "*i64",
     "scores_ptr": "*fp64", "stops_ptr": "*i64", "table_ptr": "*fp64", "parents_ptr": "*i64",
     "tokens_ptr": "*i64", "totals_ptr": "*fp64", "vocab": "i32", "stride_x": "i32", "num_chunks": "i32",
     "num_stops": "i32", **{c: "constexpr" for c in ("W", "K", "PB", "KEEP", "BLOCK", "M_PAD", "C_PAD",
     "S_PAD", "W_PAD")}}, {"W": 4, "K": 9, "PB": 9, "KEEP": 8, "BLOCK": 4096, "M_PAD": 512, "C_PAD": 64,
     "S_PAD": 16, "W_PAD": 16}),
    (a._beam_ahead_kernel, {**{p: "*i64" for p in ("parents_ptr", "tokens_ptr")}, "slot_ptr": "*i32",
     **{p: "*i64" for p in ("places_ptr", "shared_ptr", "tails_ptr", "positions_ptr")}, "tables_ptr": "*i32",
     "src_ptr": "*i64", "ids_ptr": "*i64", **{p: "i32" for p in ("stride_pg", "stride_pw", "stride_tg",
     "stride_tw", "stride_sg", "stride_sw", "w_prev", "max_blocks", "W")}, "HAS_POSITIONS": "constexpr",
     "BLOCK_C": "constexpr"}, {"HAS_POSITIONS": True, "BLOCK_C": 128}),
]:
    kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-2000:]
