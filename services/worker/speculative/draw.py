"""How a model-based proposer (a draft model, an EAGLE head) picks its next draft token per row:
greedy requests take the argmax, the others draw from the draft's processed distribution q (kept
for rejection sampling) with their own salted random numbers. Penalties and min_tokens bans apply
as the target applies them, so a draft that agrees with the target, agrees."""

from __future__ import annotations

import torch

from services.worker.sampler import SamplingMetadata
from services.worker.sampling_rng import exponential_race
from services.worker.speculative.rejection import DRAFT_SALT, salted
from services.worker.speculative.verify import penalized_logits, probs_of


def draw_drafts(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[list[int], torch.Tensor | None]:
    """Each row's draft token from [B, V] logits, and q [B, V] when some request samples."""
    logits = penalized_logits(logits, meta)
    if meta.all_greedy:
        return logits.argmax(dim=-1).tolist(), None
    assert meta.draws is not None
    q = probs_of(logits, meta)
    sampled = exponential_race(q, salted(meta.draws, DRAFT_SALT))
    tokens = torch.where(meta.greedy, logits.argmax(dim=-1), sampled)
    return tokens.tolist(), q
