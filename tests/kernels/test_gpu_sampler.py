"""GpuSampler (vectorised, hashed seeded noise) against the reference Sampler, on the CPU."""

from __future__ import annotations

import torch

from services.worker.gpu_sampler import GpuSampler, hashed_exponential
from services.worker.sampler import Sampler, SamplingMetadata, row_seed


def _meta(
    rows: int, seeds: list[int | None], temperature: float = 0.7, **overrides: object
) -> SamplingMetadata:
    def col(v: float) -> torch.Tensor:
        return torch.full((rows,), v, dtype=torch.float32)

    fields: dict[str, object] = dict(
        temperature=col(temperature),
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=col(1.0),
        min_p=col(0.0),
        repetition_penalty=col(1.0),
        presence_penalty=col(0.0),
        frequency_penalty=col(0.0),
        output_ids=[[] for _ in range(rows)],
        prompt_ids=[[] for _ in range(rows)],
        banned_ids=[[] for _ in range(rows)],
        seeds=seeds,
        num_logprobs=[None] * rows,
        all_greedy=temperature == 0.0,
        need_filter=False,
        need_penalties=False,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)  # type: ignore[arg-type]


def test_hashed_noise_is_exponential_and_row_local() -> None:
    seeds = torch.tensor([row_seed(s, 0, 0) - (1 << 63) for s in range(4)], dtype=torch.int64)
    noise = hashed_exponential(seeds, 50000)
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.var().item() - 1.0) < 0.05
    assert torch.equal(hashed_exponential(seeds[2:3], 50000), noise[2:3])  # independent of the other rows
    assert not torch.equal(noise[0], noise[1])


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    seeds: list[int | None] = [11, None, 22, None, 33]
    sampler = GpuSampler(torch.Generator().manual_seed(1))
    batch = sampler(logits, _meta(5, seeds)).token_ids
    for row in (0, 2, 4):
        alone = GpuSampler(torch.Generator().manual_seed(99))(logits[row : row + 1], _meta(1, [seeds[row]]))
        assert alone.token_ids[0] == batch[row]
    # Different seeds actually give different draws somewhere.
    many = [GpuSampler(torch.Generator())(logits[:1], _meta(1, [s])).token_ids[0] for s in range(40)]
    assert len(set(many)) > 5


def test_penalties_and_bans_match_the_reference_sampler() -> None:
    gen = torch.Generator().manual_seed(2)
    rows, vocab = 4, 64
    logits = torch.randn(rows, vocab, generator=gen)
    meta = _meta(
        rows,
        [None] * rows,
        temperature=0.0,
        repetition_penalty=torch.tensor([1.0, 1.3, 1.1, 2.0]),
        presence_penalty=torch.tensor([0.0, 0.5, 0.0, 1.0]),
        frequency_penalty=torch.tensor([0.2, 0.0, 0.0, 0.3]),
        output_ids=[[1, 1, 5], [], [7, 8, 7], [63]],
        prompt_ids=[[2, 3], [4], [], [0, 1, 2]],
        banned_ids=[[], [5, 6], [], [9]],
        need_penalties=True,
    )
    expected = Sampler._apply_penalties(logits.clone(), meta)
    torch.testing.assert_close(GpuSampler._apply_penalties(logits.clone(), meta), expected)
    ours = GpuSampler(torch.Generator())(logits, meta).token_ids
    ref = Sampler(torch.Generator())(logits, meta).token_ids
    assert ours == ref
