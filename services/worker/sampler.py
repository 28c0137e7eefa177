"""Token choice from the last-position logits of each sampling row, the same code on CPU and GPU.

Order (as vLLM): logprobs are taken from the raw model distribution (log_softmax of the fp32
logits) first; then min_tokens masks the stop ids, `logit_bias` adds to its tokens' logits,
penalties apply (repetition over prompt and output, presence / frequency over the output),
greedy rows take the argmax, and the other rows divide by the temperature, keep top-k / top-p /
min-p, and sample with the exponential race of `sampling_rng.py` (draws keyed by seed, choice,
output position and token: the same tokens whatever the batch, the step or the device).

Every per-row step is one batched tensor operation (bans and penalties scatter all rows' ids at
once as flattened (row, id) pairs; no per-row loop touches the device), and `sample_tensors`
never waits for the device: the caller reads the ids when it needs them (the step's one
synchronisation), so it can launch more work first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.worker.request import TokenLogprob
from services.worker.sampling_rng import exponential_race


@dataclass(frozen=True)
class SamplingMetadata:
    greedy: torch.Tensor  # [S] bool: SamplingParams.is_greedy of each row
    temperature: torch.Tensor  # [S] float32; 1 for greedy rows (they never divide by it)
    top_k: torch.Tensor  # [S] int64; 0 = off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    repetition_penalty: torch.Tensor  # [S] float32
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    output_ids: list[list[int]]  # [S][*] output so far, for penalties
    prompt_ids: list[list[int]]  # [S][*] prompt, for the repetition penalty
    banned_ids: list[list[int]]  # [S][*] stop ids masked because min_tokens is not reached
    # [S, 3] int64 (seed, choice index, output position) keying the draws (sampling_rng.py); None
    # when all rows are greedy
    draws: torch.Tensor | None
    num_logprobs: list[int | None]  # [S] None: no logprobs; k: sampled + k top
    all_greedy: bool
    need_filter: bool  # some row uses top-k, top-p or min-p
    need_penalties: bool
    # [S][*] (token id, bias) of each row's logit_bias; empty (the default): no row has one
    logit_bias: list[tuple[tuple[int, float], ...]] = field(default_factory=list)

    @property
    def has_logit_bias(self) -> bool:
        return any(self.logit_bias)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [S]
    logprobs: list[TokenLogprob | None]  # [S]


def flat_pairs(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row index, id) index tensors for all ids of all rows, or None when there are none."""
    lengths = [len(r) for r in rows]
    if not any(lengths):
        return None
    ids = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    return row_idx.to(device, non_blocking=True), ids.to(device, non_blocking=True)


class Sampler:
    def __init__(self, race: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        # the exponential race: sampling_rng's (the definition), or a kernel bundle's one-pass twin
        self.race = race or exponential_race

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [S, V]; the ids and logprobs read back to the host."""
        token_ids, raw_logprobs = self.sample_tensors(logits, meta)
        ids = token_ids.tolist()
        return SamplerOutput(
            ids,
            token_logprobs(raw_logprobs, token_ids, meta.num_logprobs)
            if raw_logprobs is not None
            else [None] * len(ids),
        )

    def sample_tensors(
        self, logits: torch.Tensor, meta: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled ids [S] int64 and, when a row wants logprobs, the raw log-softmax [S, V], both
        left on the logits' device: nothing here waits for the device (host->device copies are
        async), so the caller can launch more work before reading them."""
        logits = logits.float()
        want_logprobs = any(k is not None for k in meta.num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        banned = flat_pairs(meta.banned_ids, logits.device)
        if banned is not None or meta.need_penalties or meta.has_logit_bias:
            logits = logits.clone()
        if banned is not None:
            logits.index_put_(banned, torch.full((), float("-inf"), device=logits.device))
        if meta.has_logit_bias:
            self._apply_logit_bias(logits, meta.logit_bias)
        if meta.need_penalties:
            logits = self._apply_penalties(logits, meta)
        token_ids = logits.argmax(dim=-1) if meta.all_greedy else self._sample(logits, meta)
        return token_ids, raw_logprobs

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, bias: list[tuple[tuple[int, float], ...]]) -> None:
        """Add each row's biases to its logits in place: one scatter for all rows (a banned -inf
        stays -inf; a +100 on a masked token keeps it masked)."""
        pairs = flat_pairs([[t for t, _ in row] for row in bias], logits.device)
        assert pairs is not None
        values = torch.tensor([b for row in bias for _, b in row], dtype=torch.float32)
        logits.index_put_(pairs, values.to(logits.device, non_blocking=True), accumulate=True)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        num_rows, vocab = logits.shape
        device = logits.device
        counts = torch.zeros(num_rows, vocab, device=device)
        in_prompt = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
        out_pairs = flat_pairs(meta.output_ids, device)
        if out_pairs is not None:
            counts.index_put_(out_pairs, torch.ones(out_pairs[0].shape[0], device=device), accumulate=True)
        prompt_pairs = flat_pairs(meta.prompt_ids, device)
        if prompt_pairs is not None:
            in_prompt.index_put_(prompt_pairs, torch.ones((), dtype=torch.bool, device=device))
        rep = meta.repetition_penalty[:, None]
        seen = in_prompt | (counts > 0)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        logits = logits - meta.frequency_penalty[:, None] * counts
        return logits - meta.presence_penalty[:, None] * (counts > 0).float()

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        assert meta.draws is not None, "rows that sample need their draw table"
        scaled = logits / meta.temperature[:, None]
        if meta.need_filter:
            scaled = self._filter(scaled, meta)
        sampled = self.race(torch.softmax(scaled, dim=-1), meta.draws)
        return torch.where(meta.greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _filter(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        vocab = logits.shape[1]
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        top_k = torch.where(meta.top_k > 0, meta.top_k, torch.full_like(meta.top_k, vocab))
        drop = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # top-p: drop a token when the tokens before it already reach top_p (the first always stays)
        drop = drop | ((probs.cumsum(dim=-1) - probs) >= meta.top_p[:, None])
        drop = drop | (probs < meta.min_p[:, None] * probs[:, :1])
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def token_logprobs(
    raw: torch.Tensor,  # [R, V] log_softmax of the fp32 logits
    token_ids: torch.Tensor,  # [R] int64: the token of each row (sampled, or the prompt's next token)
    num_logprobs: list[int | None],  # [R] None: nothing for that row; k: the token's and k top ones
) -> list[TokenLogprob | None]:
    return unpack_logprobs(logprob_table(raw, token_ids, num_logprobs).tolist(), num_logprobs)


def logprob_table(
    raw: torch.Tensor,  # [R, V] log_softmax of the fp32 logits
    token_ids: torch.Tensor,  # [R] int64
    num_logprobs: list[int | None],
) -> torch.Tensor:
    """Everything `unpack_logprobs` reads, on the device: per row the token, its logprob and rank,
    then the top k_max ids and logprobs, as [R, 3 + 2 k_max] float64 (exact for ids, ranks and
    fp32 logprobs). One table so that the host reads it back with one copy (each .tolist() of a
    device tensor waits for the device; beam search reads every row's candidates every step), and
    its ops can be enqueued with the step (ModelRunner._handle) rather than after its wait."""
    chosen = raw.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (raw > chosen).sum(dim=-1, keepdim=True) + 1
    k_max = max((k for k in num_logprobs if k), default=0)
    columns = [token_ids[:, None].double(), chosen.double(), ranks.double()]
    if k_max:
        top_vals, top_ids = raw.topk(k_max, dim=-1)
        columns += [top_ids.double(), top_vals.double()]
    return torch.cat(columns, dim=1)


def unpack_logprobs(rows: list[list[float]], num_logprobs: list[int | None]) -> list[TokenLogprob | None]:
    """The TokenLogprobs of a `logprob_table` read back to the host."""
    k_max = max((k for k in num_logprobs if k), default=0)
    out: list[TokenLogprob | None] = []
    for values, k in zip(rows, num_logprobs, strict=True):
        if k is None:
            out.append(None)
            continue
        # a guided row's masked tokens (-inf) are no alternatives: fewer than k may remain
        top = tuple(
            (int(t), v)
            for t, v in zip(values[3 : 3 + k], values[3 + k_max : 3 + k_max + k], strict=True)
            if v > -math.inf
        )
        out.append(TokenLogprob(int(values[0]), values[1], int(values[2]), top))
    return out
