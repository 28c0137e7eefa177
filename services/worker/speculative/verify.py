"""The sampling of a step that verifies drafts: every position of a drafted sequence is scored
(its last token and its K drafts, computed in the step's one forward like a prefill chunk), the
target drawn at each exactly as the sampler draws it without speculation, and the drafts checked
(rejection.py). Entries without a draft sample as usual, in the same batch.

A drafted sequence's row j is sampled as if drafts[:j] were already its output: penalties count
them, the draws are keyed by output position + j, min_tokens is judged at that length, and a
guided row is masked by the grammar state after them (Draft.masks). So each emitted token is the
one decoding without speculation would give at its position (greedy, and seeded point-mass rows),
or one drawn from the same distribution (a draft model's rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.worker.async_step import StepHandle
from services.worker.guided import GuidedRows, apply_token_mask
from services.worker.request import Sequence, TokenLogprob
from services.worker.sampler import Sampler, SamplingMetadata, flat_pairs, token_logprobs
from services.worker.scheduler import SchedulerOutput
from services.worker.speculative.rejection import emitted_tokens, point_mass_keep, reject_rows

MetadataBuilder = Callable[[list[Sequence], list[list[int]]], SamplingMetadata]


def penalized_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[S, V] the logits after min_tokens bans, logit_bias and penalties, in the sampler's order
    (greedy rows take their argmax)."""
    logits = logits.float().clone()
    banned = flat_pairs(meta.banned_ids, logits.device)
    if banned is not None:
        logits.index_put_(banned, torch.full((), float("-inf"), device=logits.device))
    if meta.has_logit_bias:
        Sampler._apply_logit_bias(logits, meta.logit_bias)
    if meta.need_penalties:
        logits = Sampler._apply_penalties(logits, meta)
    return logits


def target_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[S, V] the distribution the sampler draws non-greedy rows from (bans, penalties,
    temperature, top-k / top-p / min-p): the p of rejection sampling."""
    return probs_of(penalized_logits(logits, meta), meta)


def probs_of(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[S, V] softmax of penalized logits after temperature and top-k / top-p / min-p."""
    scaled = logits / meta.temperature[:, None]
    if meta.need_filter:
        scaled = Sampler._filter(scaled, meta)
    return torch.softmax(scaled, dim=-1)


def verify_step(
    out: SchedulerOutput,
    hidden: torch.Tensor,  # [T, H] the step's hidden states
    cu_seqlens: list[int],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    sampler: Sampler,
    build_meta: MetadataBuilder,
) -> StepHandle:
    """Sample every sampling entry of `out` (drafted ones verified); the handle's result gives, per
    entry, the tokens it appends (a drafted one: kept drafts then one more)."""
    device = hidden.device
    hidden_rows: list[int] = []
    seqs: list[Sequence] = []
    drafted: list[list[int]] = []  # per row: the drafts before it (its virtual output suffix)
    masks: list[bytes | None] = []
    # per sampling row group: (entry, first row, K, kind) — kind "plain" (no draft), "draft"
    groups: list[tuple[int, int, int]] = []
    for i, item in enumerate(out.scheduled):
        if not item.sample or item.seq.request.req.pooling:  # (an embedding: the runner pooled it)
            continue
        end = cu_seqlens[i + 1]
        draft = item.draft
        if draft is None:
            for s in (item.seq, *item.children):
                groups.append((i, len(seqs), 0))
                hidden_rows.append(end - 1)
                seqs.append(s)
                drafted.append([])
                masks.append(s.guided.mask if s.guided is not None else None)
            continue
        k = draft.k
        groups.append((i, len(seqs), k))
        for j in range(k + 1):
            hidden_rows.append(end - 1 - k + j)
            seqs.append(item.seq)
            drafted.append(draft.token_ids[:j])
            masks.append(draft.masks[j] if draft.masks is not None else None)
    if not seqs:
        return StepHandle(len(out.scheduled), [], None, None)
    index = torch.tensor(hidden_rows, dtype=torch.int64).to(device, non_blocking=True)
    logits = compute_logits(hidden.index_select(0, index)).float()
    guided_at = [r for r, m in enumerate(masks) if m is not None]
    if guided_at:
        words = b"".join(m for m in masks if m is not None)
        table = torch.frombuffer(bytearray(words), dtype=torch.int32).view(len(guided_at), -1)
        logits = apply_token_mask(logits, GuidedRows(guided_at, table))
    meta = build_meta(seqs, drafted)
    target, raw = sampler.sample_tensors(logits, meta)

    # Rows whose draft came from a distribution q and whose request samples: rejection sampling.
    reject_at: list[int] = []  # row of each such draft position
    q_rows: list[torch.Tensor] = []
    draft_ids: list[int] = []
    for entry, first, k in groups:
        draft = out.scheduled[entry].draft
        if k and draft is not None and draft.probs is not None and not seqs[first].request.sampling.is_greedy:
            reject_at += range(first, first + k)
            q_rows.append(draft.probs[:k])
            draft_ids += draft.token_ids
    keep_rows: dict[int, bool] = {}
    replacement_rows: dict[int, int] = {}
    if reject_at:
        assert meta.draws is not None
        at = torch.tensor(reject_at, dtype=torch.int64).to(device, non_blocking=True)
        p = target_probs(logits.index_select(0, at), _select(meta, reject_at, at))
        keep, replacement = reject_rows(
            p,
            torch.cat(q_rows).float(),
            torch.tensor(draft_ids, device=device),
            meta.draws.index_select(0, at),
        )
        keep_rows = dict(zip(reject_at, keep.tolist(), strict=True))
        replacement_rows = dict(zip(reject_at, replacement.tolist(), strict=True))
    target_ids = target.tolist()  # the step's synchronisation

    entries: list[int] = []
    emitted: list[int] = []
    emitted_rows: list[int] = []  # the row (position) each emitted token was drawn at
    for entry, first, k in groups:
        draft = out.scheduled[entry].draft
        if not k or draft is None:
            entries.append(entry)
            emitted.append(target_ids[first])
            emitted_rows.append(first)
            continue
        rows = range(first, first + k)
        if first in keep_rows:
            keep_list = [keep_rows[r] for r in rows]
            replacements = [replacement_rows[r] for r in rows]
        else:
            keep_list = point_mass_keep(target_ids[first : first + k], draft.token_ids)
            replacements = target_ids[first : first + k]
        tokens = emitted_tokens(draft.token_ids, keep_list, replacements, target_ids[first + k])
        entries += [entry] * len(tokens)
        emitted += tokens
        emitted_rows += range(first, first + len(tokens))
    logprobs: list[TokenLogprob | None] = [None] * len(emitted)
    if raw is not None:
        ks = [meta.num_logprobs[r] for r in emitted_rows]
        sel = torch.tensor(emitted_rows, dtype=torch.int64, device=device)
        logprobs = token_logprobs(raw.index_select(0, sel), torch.tensor(emitted, device=device), ks)
    result = (emitted, logprobs)
    return StepHandle(len(out.scheduled), entries, None, lambda: result)


def _select(meta: SamplingMetadata, rows: list[int], at: torch.Tensor) -> SamplingMetadata:
    """The metadata of `rows` only."""
    return SamplingMetadata(
        greedy=meta.greedy.index_select(0, at),
        temperature=meta.temperature.index_select(0, at),
        top_k=meta.top_k.index_select(0, at),
        top_p=meta.top_p.index_select(0, at),
        min_p=meta.min_p.index_select(0, at),
        repetition_penalty=meta.repetition_penalty.index_select(0, at),
        presence_penalty=meta.presence_penalty.index_select(0, at),
        frequency_penalty=meta.frequency_penalty.index_select(0, at),
        output_ids=[meta.output_ids[r] for r in rows],
        prompt_ids=[meta.prompt_ids[r] for r in rows],
        banned_ids=[meta.banned_ids[r] for r in rows],
        draws=meta.draws.index_select(0, at) if meta.draws is not None else None,
        num_logprobs=[meta.num_logprobs[r] for r in rows],
        all_greedy=False,
        need_filter=meta.need_filter,
        need_penalties=meta.need_penalties,
        logit_bias=[meta.logit_bias[r] for r in rows] if meta.logit_bias else [],
    )
