"""What a proposer hands the verification step for one sequence (ScheduledSequence.draft)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """K proposed tokens that follow a decoding sequence's last token.

    The step computes the last token and the K drafts (K + 1 positions, one forward) and samples
    the target at each; `rejection.py` decides how many drafts are kept."""

    token_ids: list[int]  # [K] the proposed tokens
    # [K, V] float32 on the device: the distribution each draft was drawn from (a draft model's q);
    # None for draft-free proposals (prompt lookup): a point mass on each token
    probs: torch.Tensor | None = None
    # guided decoding: the grammar's next-token mask (int32 words) after the sequence's tokens plus
    # drafts[:j], for j = 0..K (mask 0 is the state's own): the target is masked as it would be
    masks: list[bytes] | None = None

    @property
    def k(self) -> int:
        return len(self.token_ids)
