"""The sampler with every per-row step vectorised, for the GPU (same semantics as `Sampler`).

`Sampler` (sampler.py) loops over rows in Python for min_tokens bans, penalties and seeded
draws; with hundreds of rows on a GPU each of those loops is hundreds of tiny launches and
host-device copies. Here each is one batched operation:
- bans and penalties scatter all rows' ids at once (flattened (row, id) index pairs);
- a seeded row's exponential noise is a counter-based hash of (row seed, vocab index) computed on
  the device (splitmix64), so it depends on the request's seed, choice and output position only:
  the same tokens whatever the batch, the step or the GPU it runs on.
Unseeded rows draw from the worker's shared device generator, as before.
"""

from __future__ import annotations

import torch

from services.worker.sampler import Sampler, SamplerOutput, SamplingMetadata, flat_pairs

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hashed_exponential(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [S, vocab] float32 from row seeds [S] int64: splitmix64(seed ^ index * golden)."""
    index = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = seeds[:, None] ^ (index[None, :] * _GOLDEN)  # int64 products wrap, as the hash wants
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    uniform = (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))  # 24 random bits, strictly inside (0, 1)
    return -torch.log(uniform)


class GpuSampler(Sampler):
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [S, V] float32 on the device."""
        token_ids, raw_logprobs = self.sample_tensors(logits, meta)
        ids = token_ids.tolist()  # the step's one synchronisation
        return SamplerOutput(
            ids,
            self._logprobs(raw_logprobs, token_ids, meta) if raw_logprobs is not None else [None] * len(ids),
        )

    def sample_tensors(
        self, logits: torch.Tensor, meta: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled ids [S] int64 and, when a row wants logprobs, the raw log-softmax [S, V], both
        left on the device: nothing here waits for the device (host->device copies are async), so
        the caller can launch more work before reading them."""
        logits = logits.float()
        want_logprobs = any(k is not None for k in meta.num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        banned = flat_pairs(meta.banned_ids, logits.device)
        if banned is not None or meta.need_penalties:
            logits = logits.clone()
        if banned is not None:
            logits.index_put_(banned, torch.full((), float("-inf"), device=logits.device))
        if meta.need_penalties:
            logits = self._apply_penalties(logits, meta)
        token_ids = logits.argmax(dim=-1) if meta.all_greedy else self._sample(logits, meta)
        return token_ids, raw_logprobs

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy = meta.temperature == 0
        temperature = torch.where(greedy, torch.ones_like(meta.temperature), meta.temperature)
        scaled = logits / temperature[:, None]
        if meta.need_filter:
            scaled = self._filter(scaled, meta)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        seeded_rows = [row for row, s in enumerate(meta.seeds) if s is not None]
        if seeded_rows:
            seeds = torch.tensor([_i64(meta.seeds[r] or 0) for r in seeded_rows], dtype=torch.int64)
            rows = torch.tensor(seeded_rows, dtype=torch.int64)
            # non_blocking: a pageable host->device copy is staged at once and does not wait for
            # the device (a blocking one would stall on the step still running ahead of this one)
            q[rows.to(q.device, non_blocking=True)] = hashed_exponential(
                seeds.to(q.device, non_blocking=True), probs.shape[1]
            )
        # A draw of exactly 0 (the hash's top value rounds its uniform to 1.0 in float32; the
        # device generator may give 0 too) made a filtered, banned or guided-masked token (p = 0)
        # win through 0 / 0 = NaN; the smallest positive draw keeps every other choice as it was.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)
