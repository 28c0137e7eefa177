"""The sampler and its random numbers (sampling_rng.py): the draws are the documented definition,
seeded rows do not depend on the batch, and (marker gpu) the CPU and the GPU pick the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.sampler import Sampler, SamplingMetadata
from services.worker.sampling_rng import draw_table, exponential, exponential_race, uniform

M64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(x: int) -> int:
    """splitmix64's finalizer on Python ints (the definition, written independently of torch)."""
    x = ((x ^ (x >> 30)) * MIX1) & M64
    x = ((x ^ (x >> 27)) * MIX2) & M64
    return x ^ (x >> 31)


def _uniform(seed: int, choice: int, position: int, token: int) -> float:
    """The docstring of sampling_rng.py, line by line, in unsigned 64-bit integers."""
    row = _mix(_mix(seed ^ _mix((choice * GOLDEN) & M64)) ^ position)
    bits = (((row ^ _mix((token * GOLDEN) & M64)) * MIX2) & M64) >> 41
    return (bits + 0.5) / 2**23


def _meta(
    logits: torch.Tensor,
    draws: list[tuple[int, int, int]],
    temperature: list[float],
    top_k: list[int] | None = None,
    top_p: list[float] | None = None,
    min_p: list[float] | None = None,
    **overrides: object,
) -> SamplingMetadata:
    rows = logits.shape[0]
    device = logits.device

    def col(values: list[float] | None, default: float) -> torch.Tensor:
        return torch.tensor(values if values is not None else [default] * rows, dtype=torch.float32).to(
            device
        )

    greedy = [t == 0.0 for t in temperature]
    fields: dict[str, object] = dict(
        greedy=torch.tensor(greedy, device=device),
        temperature=col([1.0 if g else t for g, t in zip(greedy, temperature, strict=True)], 1.0),
        top_k=torch.tensor(top_k or [0] * rows, dtype=torch.int64, device=device),
        top_p=col(top_p, 1.0),
        min_p=col(min_p, 0.0),
        repetition_penalty=col(None, 1.0),
        presence_penalty=col(None, 0.0),
        frequency_penalty=col(None, 0.0),
        output_ids=[[] for _ in range(rows)],
        prompt_ids=[[] for _ in range(rows)],
        banned_ids=[[] for _ in range(rows)],
        draws=draw_table(draws).to(device),
        num_logprobs=[None] * rows,
        all_greedy=all(greedy),
        need_filter=top_k is not None or top_p is not None or min_p is not None,
        need_penalties=False,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)  # type: ignore[arg-type]


def test_draws_are_the_documented_definition() -> None:
    draws = [(0, 0, 0), (1234, 0, 7), (2**64 - 1, 3, 100), (2**63, 1, 2**20), (99, 2**31 - 1, 5)]
    vocab = 300
    got = uniform(draw_table(draws), vocab)
    want = torch.tensor([[_uniform(*d, t) for t in range(vocab)] for d in draws], dtype=torch.float32)
    assert torch.equal(got, want)  # bit for bit: (bits + 0.5) / 2**23 is exact in float32
    assert (got > 0).all() and (got < 1).all()


def test_cpu_sampler_draws_match_the_definition() -> None:
    """Each sampled row is argmax(probs / -log u) with u from the definition above."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab = 24, 97
    logits = torch.randn(rows, vocab, generator=gen) * 3
    draws = [(1000 + r, r % 3, r * 7) for r in range(rows)]
    temperature = [0.5 + 0.05 * r for r in range(rows)]
    ids = Sampler()(logits, _meta(logits, draws, temperature)).token_ids
    for r in range(rows):
        probs = torch.softmax(logits[r].double() / torch.tensor(temperature[r]).float().double(), dim=-1)
        scores = [probs[t].item() / -math.log(_uniform(*draws[r], t)) for t in range(vocab)]
        assert ids[r] == max(range(vocab), key=scores.__getitem__)


def test_noise_is_exponential_and_row_local() -> None:
    draws = draw_table([(s, 0, 0) for s in range(4)])
    noise = exponential(draws, 50000)
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.var().item() - 1.0) < 0.05
    assert torch.equal(exponential(draws[2:3], 50000), noise[2:3])  # independent of the other rows
    assert not torch.equal(noise[0], noise[1])


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    draws = [(11, 0, 3), (12, 1, 0), (22, 0, 9), (5, 2, 4), (33, 0, 0)]
    batch = Sampler()(logits, _meta(logits, draws, [0.7] * 5)).token_ids
    for row in range(5):
        one = logits[row : row + 1]
        assert Sampler()(one, _meta(one, [draws[row]], [0.7])).token_ids[0] == batch[row]
    # different seeds and positions give different draws
    one = logits[:1]
    many = {Sampler()(one, _meta(one, [(s, 0, 0)], [1.0])).token_ids[0] for s in range(40)}
    assert len(many) > 5
    assert len({Sampler()(one, _meta(one, [(1, 0, p)], [1.0])).token_ids[0] for p in range(40)}) > 5


def test_penalties_and_bans_follow_their_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    rows, vocab = 4, 64
    logits = torch.randn(rows, vocab, generator=gen)
    rep, pres, freq = [1.0, 1.3, 1.1, 2.0], [0.0, 0.5, 0.0, 1.0], [0.2, 0.0, 0.0, 0.3]
    outputs, prompts, banned = (
        [[1, 1, 5], [], [7, 8, 7], [63]],
        [[2, 3], [4], [], [0, 1, 2]],
        [[], [5, 6], [], [9]],
    )
    meta = _meta(
        logits,
        [(0, 0, 0)] * rows,
        [0.0] * rows,
        repetition_penalty=torch.tensor(rep),
        presence_penalty=torch.tensor(pres),
        frequency_penalty=torch.tensor(freq),
        output_ids=outputs,
        prompt_ids=prompts,
        banned_ids=banned,
        need_penalties=True,
    )
    expected = logits.clone()
    for r in range(rows):
        for t in set(outputs[r]) | set(prompts[r]):
            v = expected[r, t]
            expected[r, t] = v / rep[r] if v > 0 else v * rep[r]
        for t in set(outputs[r]):
            expected[r, t] -= freq[r] * outputs[r].count(t) + pres[r]
    torch.testing.assert_close(Sampler._apply_penalties(logits.clone(), meta), expected)
    for r in range(rows):
        expected[r, banned[r]] = float("-inf")
    assert Sampler()(logits, meta).token_ids == expected.argmax(dim=-1).tolist()


def test_a_token_of_probability_zero_never_wins() -> None:
    """u < 1 always (23 bits plus a half), so q = -log u > 0: a masked, filtered or banned token
    (p = 0) cannot win through 0 / 0 = NaN (the old 24-bit draw rounded to 1.0 about once in
    2**24 draws, and did on an H200)."""
    vocab = 4096
    logits = torch.zeros(64, vocab)
    logits[:, ::2] = float("-inf")
    draws = [(s, 0, p) for s in range(8) for p in range(8)]
    ids = Sampler()(logits, _meta(logits, draws, [1.0] * 64)).token_ids
    assert all(t % 2 == 1 for t in ids)


def _mixed_rows(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, dict[str, list]]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    pick = torch.randint(0, 6, (rows,), generator=gen).tolist()
    temperature = [[0.0, 0.3, 0.7, 1.0, 1.3, 2.0][k] for k in pick]
    top_k = torch.randint(0, 60, (rows,), generator=gen).tolist()
    top_p = [[1.0, 0.9, 0.5, 0.95, 0.8, 1.0][(k + 1) % 6] for k in pick]
    min_p = [[0.0, 0.05, 0.0, 0.1, 0.0, 0.02][(k + 2) % 6] for k in pick]
    draws = [(r * 7919 + 13, r % 4, r % 50) for r in range(rows)]
    return logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, draws=draws)


def test_triton_race_is_the_definition() -> None:
    """The one-pass Triton race (the CUDA bundle's, here on the interpreter) picks what
    sampling_rng.exponential_race picks: zeros, a tie across chunks, vocabularies off the chunk."""
    pytest.importorskip("triton")
    from kernels.triton.exponential_race import BLOCK
    from kernels.triton.exponential_race import exponential_race as triton_race

    gen = torch.Generator().manual_seed(3)
    for rows, vocab in ((3, 7), (4, BLOCK), (5, 2 * BLOCK + 9)):
        probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 3, dim=-1)
        probs[0] = 0.0
        probs[0, vocab - 1] = 1.0  # one possible token
        probs[1, ::2] = 0.0
        draws = draw_table([(2**64 - 1 - r, r, 3 * r) for r in range(rows)])
        assert torch.equal(triton_race(probs, draws), exponential_race(probs, draws)), (rows, vocab)


@pytest.mark.gpu
def test_cpu_reference_and_gpu_sampler_pick_the_same_tokens() -> None:
    """The same logits and seeds on the CPU (the reference sampler) and on CUDA (the sampler as
    the model runner builds it there, with the Triton race; and with the torch race): the same
    token ids, row for row, with greedy, temperature, top-k, top-p and min-p mixed in one batch."""
    from kernels import get_ops

    assert torch.cuda.is_available(), "marker gpu: run on the device"
    cuda = torch.device("cuda")
    gpu_race = get_ops("auto", cuda).exponential_race
    assert gpu_race is not None
    for seed, (rows, vocab) in enumerate([(512, 1000), (256, 32000), (64, 151936)]):
        logits, p = _mixed_rows(rows, vocab, seed)
        args = (p["draws"], p["temperature"], p["top_k"], p["top_p"], p["min_p"])
        cpu = Sampler()(logits, _meta(logits, *args)).token_ids
        gpu_logits = logits.to(cuda)
        for sampler in (Sampler(gpu_race), Sampler()):
            token_ids, _ = sampler.sample_tensors(gpu_logits, _meta(gpu_logits, *args))
            gpu = token_ids.tolist()
            assert gpu == cpu, [(r, cpu[r], gpu[r]) for r in range(rows) if cpu[r] != gpu[r]][:10]
        assert torch.equal(
            uniform(draw_table(p["draws"]).to(cuda), vocab).cpu(), uniform(draw_table(p["draws"]), vocab)
        )


def _biased_rows(rows: int, vocab: int, seed: int) -> list[tuple[tuple[int, float], ...]]:
    """Each row's logit_bias: a few ids with biases across [-100, 100], some rows none."""
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[tuple[int, float], ...]] = []
    for r in range(rows):
        if r % 3 == 2:
            out.append(())
            continue
        ids = torch.randperm(vocab, generator=gen)[: 1 + r % 5].tolist()
        values = (torch.rand(len(ids), generator=gen) * 200 - 100).tolist()
        out.append(tuple(sorted(zip(ids, values, strict=True))))
    return out


def test_logit_bias_forces_bans_and_shifts() -> None:
    """+100 makes a token the greedy and the sampled choice, -100 bans it, a small bias is the
    same as adding it to the logits; logprobs stay those of the unbiased logits (vLLM's default)."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab = 6, 97
    logits = torch.randn(rows, vocab, generator=gen) * 3
    top = logits.argmax(dim=-1).tolist()
    forced = [(5 * r + 1) % vocab for r in range(rows)]
    bias = [((forced[r], 100.0),) for r in range(rows)]
    draws = [(r, 0, 0) for r in range(rows)]
    for temperature in ([0.0] * rows, [1.0] * rows):
        meta = _meta(logits, draws, temperature, logit_bias=bias, num_logprobs=[2] * rows)
        out = Sampler()(logits, meta)
        assert out.token_ids == forced
        raw = torch.log_softmax(logits, dim=-1)
        for r, lp in enumerate(out.logprobs):
            assert lp is not None and lp.logprob == pytest.approx(raw[r, forced[r]].item(), abs=1e-6)
    banned = [((top[r], -100.0),) for r in range(rows)]
    ids = Sampler()(logits, _meta(logits, draws, [0.0] * rows, logit_bias=banned)).token_ids
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    assert ids == second
    for s in range(30):  # sampled rows never draw a banned token either
        many = Sampler()(
            logits, _meta(logits, [(s, 0, p) for p in range(rows)], [2.0] * rows, logit_bias=banned)
        )
        assert all(t != top[r] for r, t in enumerate(many.token_ids))
    small = _biased_rows(rows, vocab, seed=1)
    shifted = logits.clone()
    for r, pairs in enumerate(small):
        for t, b in pairs:
            shifted[r, t] += b
    args = (draws, [0.7] * rows, [0] * rows, [0.9] * rows, [0.05] * rows)
    assert (
        Sampler()(logits, _meta(logits, *args, logit_bias=small)).token_ids
        == Sampler()(shifted, _meta(shifted, *args)).token_ids
    )


@pytest.mark.gpu
def test_cpu_reference_and_gpu_sampler_agree_with_logit_bias() -> None:
    """As the test above, with logit_bias rows mixed in (the bias scatter runs on the device)."""
    from kernels import get_ops

    assert torch.cuda.is_available(), "marker gpu: run on the device"
    cuda = torch.device("cuda")
    gpu_race = get_ops("auto", cuda).exponential_race
    assert gpu_race is not None
    for seed, (rows, vocab) in enumerate([(256, 1000), (64, 151936)]):
        logits, p = _mixed_rows(rows, vocab, seed)
        bias = _biased_rows(rows, vocab, seed)
        args = (p["draws"], p["temperature"], p["top_k"], p["top_p"], p["min_p"])
        cpu = Sampler()(logits, _meta(logits, *args, logit_bias=bias)).token_ids
        gpu_logits = logits.to(cuda)
        for sampler in (Sampler(gpu_race), Sampler()):
            token_ids, _ = sampler.sample_tensors(gpu_logits, _meta(gpu_logits, *args, logit_bias=bias))
            gpu = token_ids.tolist()
            assert gpu == cpu, [(r, cpu[r], gpu[r]) for r in range(rows) if cpu[r] != gpu[r]][:10]
        forced = [((r * 31) % vocab, 100.0) for r in range(rows)]
        greedy_gpu, _ = Sampler(gpu_race).sample_tensors(
            gpu_logits, _meta(gpu_logits, p["draws"], [0.0] * rows, logit_bias=[(f,) for f in forced])
        )
        assert greedy_gpu.tolist() == [t for t, _ in forced]
