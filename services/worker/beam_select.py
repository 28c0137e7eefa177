"""Beam selection on the device: per beam-search request, the top K continuations over
(beams x vocab) by cumulative logprob, inside the step.

The runner calls `select_beams` right after the sampler, on the raw log-softmax of the step's
rows, for every beam-search request whose live beams are all computed in the step (a `BeamGroup`,
built by `BeamSearch.group`). Two stages on the logits' device, torch ops (on CUDA, kernels of the
bundle where they apply: `row_topk` for the first, `beam_candidates` for the second, or
`beam_topk_candidates` for both in one launch):

1. each beam row's own top `per_beam` (log-softmax values and ids, equal values in token id
   order: `ordered_topk`, or on CUDA the kernel bundle's `row_topk`, kernels/triton/row_topk.py:
   two launches instead of torch.topk's radix select and two sorts); the stop ids that
   `min_tokens` bans are then left out (as transformers' `min_new_tokens` does, after the
   log-softmax), which is why `per_beam` counts them on top of K;
2. the beam's cumulative logprob added (float64, as the host merge adds them), the rows of a group
   laid side by side ([groups, max width x per_beam], padded), and one stable descending sort:
   the first K. The global top K over beams x vocab is always among the beams' own top K. Equal
   totals go in (beam, token id) order: the lowest flat index of beams x vocab first, as
   transformers' topk over that flat row mostly (not always: torch leaves ties unspecified)
   returns them.

Only the small [groups, K] candidate table (total, place: beam x per_beam + rank - 1, token,
logprob, valid) and, when the client asked for logprobs, each group row's top alternatives go
back to the host, in the step's one read (ModelRunner._handle). `BeamSearch.advance` does the
bookkeeping on those few numbers.
"""

from __future__ import annotations

import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from services.worker.host_staging import stage

# (values [N, V], k) -> ([N, k] values, [N, k] int64 ids): best first, equal values in id order
RowTopk = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# (values, ids, scores, stops, width, per_beam, keep) -> (table, parents, tokens, totals):
# kernels/triton/beam_candidates.py
BeamCandidates = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
]
# (rows [G*W, V] fp32, scores, stops, W, k, per_beam, keep) -> (values, ids, table, parents,
# tokens, totals): both stages in one launch, kernels/triton/beam_topk_candidates.py
BeamTopkCandidates = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, int],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
]
# The sizes those kernels are for (each takes its k best by k rounds over registers holding a
# chunk's or a request's candidates); wider searches keep the torch ops.
KERNEL_MAX_K = 64  # row_topk's k (per_beam or the client's top logprobs)
KERNEL_MAX_CANDIDATES = 2048  # beam_candidates' W x per_beam


class BeamGroup(NamedTuple):  # (a tuple: one per request every step)
    """One beam-search request whose live beams are all sampling rows of this step."""

    request_id: str
    rows: list[int]  # the sampler row of each live beam, in BeamSearch.live order
    scores: list[float]  # the cumulative logprob of each live beam
    keep: int  # K: candidates the beam step needs
    per_beam: int  # each row's own top candidates considered (K plus the banned stop ids)
    banned: tuple[int, ...]  # stop ids left out (min_tokens not reached)
    user_top: int  # alternatives each token's logprob entry carries (the client's `logprobs`)
    stops: tuple[int, ...] = ()  # the request's stop ids: a candidate ending in one does not go on


class BeamCandidate(NamedTuple):  # (a tuple: K of them per request every step)
    total: float  # cumulative logprob with this token
    beam: int  # index of the parent in BeamSearch.live
    token_id: int
    logprob: float  # the token's log-softmax in its row
    rank: int  # 1 = its row's most likely token


class BeamStepResult(NamedTuple):  # (a tuple: one per request every step)
    """What the host reads of one request's selection: its K candidates best first (fewer when
    some were banned), and each live beam's top alternatives (the client's `logprobs` of them;
    empty tuples when it asked for none)."""

    candidates: list[BeamCandidate]
    alternatives: list[tuple[tuple[int, float], ...]]


@dataclass
class BeamSelection:
    """The device tensors of one step's selection (the table and tops read back by `unpack`).

    The next beams too, for a step launched before the host reads this one (launched ahead:
    beam_search.py): per group, the first `width` candidates that do not end in a stop id (what
    BeamSearch.advance keeps going, when the search goes on), best first: new beam j is the
    parent's `parents[g, j]`-th live beam with `tokens[g, j]` appended, cumulative `totals[g, j]`."""

    groups: list[BeamGroup]
    # candidates of each beam row, laid side by side (a candidate's place: beam x per_beam + rank - 1)
    per_beam: int
    # [G, K_max, 4 or 5] float64: total, place in the laid rows, token, logprob, and valid (1/0;
    # no such column when every candidate is valid)
    table: torch.Tensor
    tops: torch.Tensor | None  # [N, 2, user_top_max] float64 (ids, logprobs) of the group rows
    parents: torch.Tensor  # [G, W_max] int64
    tokens: torch.Tensor  # [G, W_max] int64
    totals: torch.Tensor  # [G, W_max] float64
    # [G, W_max, blocks] int32: the block table each live beam ran with in this step (the runner
    # fills it: a step launched ahead gathers its beams' tables from it)
    slot_tables: torch.Tensor | None = None
    _index: dict[str, int] | None = field(default=None, repr=False)

    def index(self, request_id: str) -> int | None:
        if self._index is None:  # (asked once per beam of a step launched ahead)
            self._index = {group.request_id: g for g, group in enumerate(self.groups)}
        return self._index.get(request_id)


def selection_lists(groups: list[BeamGroup]) -> list[list[int]]:
    """The host indices `select_beams` reads on the device, in its `index` order (a caller with
    indices of its own sends them in the same host->device copy: BeamStep.select): the groups'
    rows (empty when they are the step's first rows in order: a view then), the [G, W_max] laid-out
    flat rows padded with N (empty when every group has W_max rows), each row's banned stop ids
    and each group's stop ids, padded with -1 (empty when there are none)."""
    rows = [r for g in groups for r in g.rows]
    width = max(len(g.rows) for g in groups)
    num_banned = max(len(g.banned) for g in groups)
    num_stops = max(len(g.stops) for g in groups)
    slots: list[int] = []
    if any(len(g.rows) != width for g in groups):
        flat = 0
        for g in groups:
            slots += list(range(flat, flat + len(g.rows))) + [len(rows)] * (width - len(g.rows))
            flat += len(g.rows)
    return [
        [] if rows == list(range(len(rows))) else rows,
        slots,
        [b for g in groups for _ in g.rows for b in _padded(g.banned, num_banned)] if num_banned else [],
        [t for g in groups for t in _padded(g.stops, num_stops)] if num_stops else [],
    ]


def select_beams(
    raw: torch.Tensor,
    groups: list[BeamGroup],
    scores: torch.Tensor | None = None,
    index: list[torch.Tensor] | None = None,
    row_topk: RowTopk | None = None,
    beam_candidates: BeamCandidates | None = None,
    topk_candidates: BeamTopkCandidates | None = None,
) -> BeamSelection:
    """raw: [R, V] log-softmax of the step's fp32 logits (rows of other requests too). `scores`:
    float64 on the device, the cumulative logprob of each group row ([N], or [G, W] in row order),
    when the host does not know them yet (a step launched ahead: the previous selection's totals);
    else the groups'. `index`: `selection_lists(groups)` on the device, when the caller sent them
    with its own indices (else sent here, one host->device copy). `row_topk`: a kernel bundle's
    exact top k per row (KernelOps.row_topk), in place of `ordered_topk`'s torch ops;
    `beam_candidates`: its second stage in one launch (KernelOps.beam_candidates), used when no
    candidate is banned and every group has the same number of rows; `topk_candidates`: both
    stages in one launch (KernelOps.beam_topk_candidates), used in that case instead of the two."""
    device = raw.device
    num_rows = sum(len(g.rows) for g in groups)
    vocab = raw.shape[1]
    per_beam = min(max(g.per_beam for g in groups), vocab)
    user_top = min(max(g.user_top for g in groups), vocab)
    width = max(len(g.rows) for g in groups)
    num_banned = max(len(g.banned) for g in groups)
    num_stops = max(len(g.stops) for g in groups)
    # every host index of the selection in one host->device copy (each copy is a launch, and on
    # CUDA a pinned staging buffer: a beam step is short enough on small models that they count)
    rows_t, slots_t, banned_t, stops_t = (
        index if index is not None else to_device_lists(selection_lists(groups), device)
    )
    padded = slots_t.shape[0] > 0  # (some group has fewer than W_max rows)
    # (the beam rows are often all the step's rows, in order: no [N, V] copy then)
    if rows_t.shape[0]:
        picked = raw.index_select(0, rows_t)  # [N, V]
    else:
        picked = raw if raw.shape[0] == num_rows else raw[:num_rows]
    k = max(per_beam, user_top)
    if scores is None:
        base = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float64)
        if device.type == "cuda":
            base = base.pin_memory()
        scores = base.to(device, non_blocking=True)
    keep = min(max(g.keep for g in groups), width * per_beam)
    uniform = not padded and not num_banned and width * per_beam <= KERNEL_MAX_CANDIDATES
    stops = stops_t.view(len(groups), num_stops) if num_stops else stops_t
    if topk_candidates is not None and uniform and k <= KERNEL_MAX_K:  # (the usual case on CUDA)
        values, ids, table, parents, tokens, best = topk_candidates(
            picked, scores.reshape(num_rows), stops, width, k, per_beam, keep
        )
        return BeamSelection(groups, per_beam, table, _tops(values, ids, user_top), parents, tokens, best)
    if row_topk is None or k > KERNEL_MAX_K:
        row_topk = ordered_topk
    values, ids = row_topk(picked, k)  # [N, k] best first
    tops = _tops(values, ids, user_top)
    if per_beam < k:
        values, ids = values[:, :per_beam], ids[:, :per_beam]
    if beam_candidates is not None and uniform:
        table, parents, tokens, best = beam_candidates(
            values, ids, scores.reshape(num_rows), stops, width, per_beam, keep
        )
        return BeamSelection(groups, per_beam, table, tops, parents, tokens, best)
    totals = values + scores.reshape(num_rows, 1)  # (float64: the float32 values promoted)
    # per row: the banned stop ids (padded with -1, never an id) are left out
    valid: torch.Tensor | None = None
    if num_banned:
        banned = banned_t.view(num_rows, num_banned)
        valid = ~(ids[:, :, None] == banned[:, None, :]).any(dim=-1)
        totals = totals.masked_fill(~valid, -torch.inf)
    if padded:  # [G, width_max, per_beam], the missing beams' rows all -inf
        pad = torch.full((1, per_beam), -torch.inf, dtype=torch.float64, device=device)
        totals = torch.cat([totals, pad]).index_select(0, slots_t)
    laid = totals.view(len(groups), width * per_beam)
    # stable: equal totals keep their (beam, rank) order
    best, order = laid.sort(dim=1, descending=True, stable=True)
    if keep < width * per_beam:
        best, order = best[:, :keep], order[:, :keep]  # [G, K]
    if not padded:  # (the usual case) the rows are laid as `totals`: `order` indexes them too
        token = ids.reshape(len(groups), width * per_beam).gather(1, order)
        logprob = values.reshape(len(groups), width * per_beam).gather(1, order)
        # a candidate is valid unless it is banned
        ok = valid.view(len(groups), width * per_beam).gather(1, order) if valid is not None else None
    else:
        beam, rank = order // per_beam, order % per_beam
        row = slots_t.view(len(groups), width).gather(1, beam)  # flat row (N = padding)
        ids = torch.cat([ids, torch.zeros_like(ids[:1])])  # (row N: the padding row)
        values = torch.cat([values, torch.full_like(values[:1], -torch.inf)])
        token = ids[row, rank]
        logprob = values[row, rank]
        # a candidate is valid unless it is banned or padding
        if valid is not None:
            ok = torch.cat([valid, torch.zeros_like(valid[:1])])[row, rank]
        else:
            ok = row < num_rows
    # (stack promotes every column to float64 as it copies: no cast op per column; `unpack` splits
    # the place into beam and rank; no valid column when every candidate is valid)
    table = torch.stack([best, order, token, logprob] + ([ok] if ok is not None else []), dim=-1)
    # the next beams: the first `width` valid candidates not ending in a stop id (stable: best first)
    # (a parent is < W_max: in range of the [G, W_max] tables a step ahead gathers)
    if ok is None and not num_stops:  # (every candidate goes on: the first `width`, views)
        parents = order[:, :width] // per_beam
        return BeamSelection(groups, per_beam, table, tops, parents, token[:, :width], best[:, :width])
    ends = ~ok if ok is not None else None
    if num_stops:
        stops = stops_t.view(len(groups), num_stops)
        hits = (token[:, :, None] == stops[:, None, :]).any(dim=-1)
        ends = hits if ends is None else ends | hits
    assert ends is not None
    going = ends.to(torch.int8).sort(dim=1, stable=True).indices[:, :width]  # [G, W_max]
    # (a group with fewer live beams than W_max, or fewer going on than its width, finishes or
    # is not launched ahead: its extra columns only need to stay in range)
    parents = order.gather(1, going) // per_beam
    return BeamSelection(
        groups, per_beam, table, tops, parents, token.gather(1, going), best.gather(1, going)
    )


def _tops(values: torch.Tensor, ids: torch.Tensor, user_top: int) -> torch.Tensor | None:
    """[N, 2, user_top] float64 (ids, logprobs) of each row's first `user_top`; None for none."""
    if not user_top:
        return None
    return torch.stack([ids[:, :user_top].double(), values[:, :user_top].double()], dim=1)


def ordered_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.topk(k)` of [N, V] rows, equal values in token id order. torch.topk leaves the order
    of ties unspecified (on the CPU it varies with k and with what else is in the batch), and a
    beam search must not depend on it: the top 2k are taken and sorted by (value desc, token id)
    on the device ([N, 2k], small). Exact unless more than k tokens tie with the k-th (then which
    of them make the cut is topk's choice); an exact int64-key topk over the vocabulary would
    cost two more full passes over [N, V] every step."""
    wide, ids = values.topk(min(2 * k, values.shape[1]), dim=-1)
    ids, by_id = ids.sort(dim=-1)  # token id order, then a stable sort by value
    wide, order = wide.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    if k < wide.shape[1]:
        wide, order = wide[:, :k], order[:, :k]
    return wide, ids.gather(1, order)


def unpack(
    groups: list[BeamGroup],
    per_beam: int,
    table: list[list[list[float]]],
    tops: list[list[list[float]]] | None,
) -> list[BeamStepResult]:
    """The selection of each group, in `groups` order, from the tables read back to the host
    (BeamSelection.table, .per_beam, .tops)."""
    out = []
    flat = 0
    # (a table has its valid column for every candidate or for none; tuple.__new__ makes each
    # candidate without the namedtuple's Python-level __new__: K of them a request every step)
    valid_column = bool(table) and bool(table[0]) and len(table[0][0]) == 5
    new = tuple.__new__
    for g, cands in zip(groups, table, strict=True):
        kept = []
        for c in cands[: g.keep]:
            if valid_column and not c[4]:
                continue
            beam, rank = divmod(int(c[1]), per_beam)
            kept.append(new(BeamCandidate, (c[0], beam, int(c[2]), c[3], rank + 1)))
        alternatives: list[tuple[tuple[int, float], ...]]
        if tops is None or not g.user_top:
            alternatives = [()] * len(g.rows)
        else:
            alternatives = [
                tuple(
                    (int(t), v)
                    for t, v in zip(top_ids[: g.user_top], top_values[: g.user_top], strict=True)
                    if v > -torch.inf
                )
                for top_ids, top_values in tops[flat : flat + len(g.rows)]
            ]
        flat += len(g.rows)
        out.append(BeamStepResult(kept, alternatives))
    return out


def to_device_lists(lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 host lists on `device` with one host->device copy, without waiting for the device
    (pinned on CUDA): views of one tensor made by one split, in `lists` order (empty lists give
    empty views; all of them empty: no copy, one empty tensor kept per device)."""
    flat_host = array.array("q")  # (an array read in place: torch.tensor of a list costs more)
    for values in lists:
        flat_host.extend(values)
    if not flat_host:  # (a step of beams in order launched ahead: the selection needs no index)
        empty = _EMPTY.get(device)
        if empty is None:
            empty = _EMPTY[device] = torch.empty(0, dtype=torch.int64, device=device)
        return [empty] * len(lists)
    flat = stage(flat_host, device)
    return list(flat.split([len(values) for values in lists]))


# an empty int64 tensor per device: the index lists of a call that has none (to_device_lists)
_EMPTY: dict[torch.device, torch.Tensor] = {}


def _padded(values: tuple[int, ...], size: int) -> list[int]:
    """`values` padded with -1 (never a token id) to `size`."""
    return [*values, *[-1] * (size - len(values))]
