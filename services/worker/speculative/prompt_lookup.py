"""Prompt lookup (n-gram) proposals: no extra model.

The last n tokens of a sequence (n from --prompt-lookup-max down to --prompt-lookup-min) are
looked up earlier in its prompt and output; the tokens that followed the latest earlier
occurrence are the proposal. Outputs that copy spans of their input (summaries, code edits,
quoting) are accepted at a high rate; elsewhere nothing matches and the sequence is not
speculated on (it costs nothing).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.worker.request import Sequence
from services.worker.speculative.draft import Draft


def lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram
    (max_n down to min_n) of `tokens`; [] when none occurs."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = arr[-n:]
        # windows that end before the last token: the suffix itself is not a match
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


class PromptLookupProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], k: int) -> list[Draft | None]:
        out: list[Draft | None] = []
        for seq in seqs:
            tokens = lookup(seq.token_ids, k, self.min_n, self.max_n)
            out.append(Draft(tokens) if tokens else None)
        return out

    def may_propose(self, seqs: list[Sequence]) -> bool:
        return any(lookup(seq.token_ids, 1, self.min_n, self.max_n) for seq in seqs)

    def release(self, seqs: Iterable[Sequence]) -> None:
        """Nothing is kept per sequence."""

    def after_step(self, speculating: bool) -> None:
        """Nothing to do between steps."""
