"""The runner's beam-search work on the device, around the selection itself (beam_select.py).

ModelRunner holds one `BeamStep` and calls it twice a step, on the engine thread (the one thread
that owns every torch call: engine.py, async_engine.py), inside `ModelRunner.launch`; each call
only enqueues device work behind the step's, nothing here waits for the device.

- `ahead`, while the step's inputs are built, for the scheduled entries launched ahead
  (`beam_tail >= 0`: the host has not read the previous step's picks yet, beam_search.py).
  Reads: those entries' `start`, `beam_tail` and place in `BeamSearch.live`; the previous step's
  `BeamSelection` on the device (`parents`, `tokens`, `slot_tables`). Writes: the KV cache only
  (each parent's partly filled block copied into the block the entry writes, `beam_tail`: its own
  partly filled block, so a block may be one beam's source and another's destination; every
  source is read before any destination is written, every layer in one copy). Returns the
  step's input ids and those entries' block tables on the device (`AheadInputs`). With a kernel
  bundle's `beam_ahead` (CUDA) the tables, the copy's sources and the ids are one launch.
- `select`, right after the sampler. Reads: the step's raw log-softmax rows, the beam requests
  whose live beams all sample in the step (`BeamSearch.group`), the block tables the step ran
  with, and for a step launched ahead the previous selection's `totals` (their cumulative
  logprobs, not on the host yet). Writes: nothing but the `BeamSelection` it returns, whose
  `slot_tables` (the tables each group's beams ran with) the next step ahead reads.

Every host index list of a call goes to the device in one copy (`beam_select.to_device_lists`):
the ops of a beam step do not grow with the beams, requests or layers (tests/worker/test_beam_step_ops.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.worker.beam_select import (
    BeamCandidates,
    BeamSelection,
    BeamTopkCandidates,
    RowTopk,
    select_beams,
    selection_lists,
    to_device_lists,
)
from services.worker.kv_cache import KVCache
from services.worker.request import Request, Sequence
from services.worker.scheduler import SchedulerOutput

# (parents, tokens, slot_tables, places, shared, tails, max_blocks, ids, positions) ->
# (tables, src, ids): kernels/triton/beam_ahead.py
BeamAhead = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        int,
        torch.Tensor | None,
        torch.Tensor | None,
    ],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class AheadInputs:
    """A step launched ahead: what its beam entries read on the device."""

    ids: torch.Tensor  # [T] int64: the step's input ids, each entry ahead's its picked token
    tables: torch.Tensor  # [len(ahead), max_blocks] int32: the block tables of the entries ahead
    # [len(ahead)] int64: those entries' indices in the scheduled batch (empty when they are all of it)
    entries: torch.Tensor


class BeamStep:
    """The beam-specific device work of the steps of one ModelRunner (module docstring)."""

    def __init__(
        self,
        device: torch.device,
        block_size: int,
        row_topk: RowTopk | None = None,
        beam_candidates: BeamCandidates | None = None,
        beam_ahead: BeamAhead | None = None,
        topk_candidates: BeamTopkCandidates | None = None,
    ) -> None:
        self.device = device
        self.block_size = block_size
        # a kernel bundle's top k over the vocabulary and candidate selection (else torch ops),
        # and both in one launch
        self.row_topk = row_topk
        self.beam_candidates = beam_candidates
        self.topk_candidates = topk_candidates
        # and its inputs of a step ahead in one launch (kernels/triton/beam_ahead.py; else torch ops)
        self.beam_ahead = beam_ahead

    def select(
        self,
        raw: torch.Tensor,  # [R, V] log-softmax
        out: SchedulerOutput,
        rows: list[tuple[Sequence, int]],  # (sequence, scheduled entry) of each sampling row
        block_tables: torch.Tensor,  # [B, w] the step's tables (on the device for a step ahead)
        before: BeamSelection | None,  # the step before's, when this one was launched ahead of reading it
    ) -> BeamSelection | None:
        """Beam selection on the device (beam_select.py) for the beam requests whose live beams
        all sample in this step, with the tables they ran with (a next step ahead gathers them)."""
        # each beam request's rows (sequence id -> row), in the order of its first row, and
        # whether its step was launched ahead (all its beams' or none: its first row's entry)
        by_request: dict[str, tuple[Request, dict[int, int], bool]] = {}
        for r, (seq, entry) in enumerate(rows):
            request = seq.request
            if request.beam is None:
                continue
            found = by_request.get(request.request_id)
            if found is None:
                by_request[request.request_id] = (
                    request,
                    {seq.seq_id: r},
                    out.scheduled[entry].beam_tail >= 0,
                )
            else:
                found[1][seq.seq_id] = r
        groups = []
        ahead: set[str] = set()
        for request_id, (request, mine, launched_ahead) in by_request.items():
            assert request.beam is not None
            group = request.beam.group(mine, launched_ahead)
            if group is not None:
                groups.append(group)
                if launched_ahead:
                    ahead.add(request_id)
        if not groups:
            return None
        # the tables each group's live beams ran with, padded to W_max with its first beam's
        # (when they are the step's tables as they are: the usual step of beams only, a view)
        width = max(len(g.rows) for g in groups)
        entries: list[int] = []
        for g in groups:
            taken = [rows[r][1] for r in g.rows]
            entries += taken + [taken[0]] * (width - len(taken))
        same_tables = len(entries) == block_tables.shape[0] and entries == list(range(len(entries)))
        # launched ahead: their cumulative logprobs are the previous selection's, on the device
        # (positions: their flat rows; sources: where in its totals)
        num_rows = sum(len(g.rows) for g in groups)
        positions: list[int] = []
        sources: list[int] = []
        if ahead:
            assert before is not None
            before_width = before.totals.shape[1]
            flat = 0
            for g in groups:
                index = before.index(g.request_id) if g.request_id in ahead else None
                if index is not None:
                    positions += range(flat, flat + len(g.rows))
                    sources += range(index * before_width, index * before_width + len(g.rows))
                flat += len(g.rows)
        # (every row's, in the order of the previous selection's totals: those totals as they are)
        same_scores = (
            before is not None
            and len(positions) == num_rows
            and sources == list(range(before.totals.numel()))
        )
        on_host = block_tables.device != self.device  # (a step not ahead, on CUDA)
        # one host->device copy for every index here and in select_beams
        lists = selection_lists(groups)
        device_lists = to_device_lists(
            [
                *lists,
                [] if on_host or same_tables else entries,
                [] if same_scores else positions,
                [] if same_scores else sources,
            ],
            self.device,
        )
        entries_t, positions_t, sources_t = device_lists[len(lists) :]
        scores = None
        if same_scores:  # (the usual case)
            assert before is not None
            scores = before.totals
        elif sources:
            assert before is not None
            picked_scores = before.totals.reshape(-1).index_select(0, sources_t)
            if len(positions) == num_rows:
                scores = picked_scores
            else:
                host = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float64)
                scores = host.to(self.device, non_blocking=True).index_copy(0, positions_t, picked_scores)
        selection = select_beams(
            raw,
            groups,
            scores,
            device_lists[: len(lists)],
            self.row_topk,
            self.beam_candidates,
            self.topk_candidates,
        )
        if same_tables:
            picked = block_tables if not on_host else block_tables.to(self.device, non_blocking=True)
        elif on_host:
            picked = block_tables.index_select(0, torch.tensor(entries)).to(self.device, non_blocking=True)
        else:
            picked = block_tables.index_select(0, entries_t)
        selection.slot_tables = picked.view(len(groups), width, -1)
        return selection

    def ahead(
        self,
        out: SchedulerOutput,
        ahead: list[int],  # the scheduled entries of beams launched ahead
        before: BeamSelection,  # the previous step's selection (not read by the host yet)
        ids: list[int] | torch.Tensor,
        cu_seqlens: list[int],
        max_blocks: int,
        kv_cache: KVCache,
    ) -> AheadInputs:
        """A beam step launched before the host read the previous one's picks: new beam j of a
        request goes in the sequence of its live beam j. On the device, each takes its parent's
        full blocks and its `beam_tail` after them (its own partly filled block, written in place,
        or a fresh block where the position starts one), the parent's partly filled block copied
        into it first: all sources gathered, then all destinations written, so a block that is
        one beam's source and another's destination is read before it is written (a beam whose
        parent is itself copies its block onto itself); its input id is its picked token."""
        bs = self.block_size
        n = len(ahead)
        # one pass over the entries (the lookups once per request, not a search per beam)
        groups = []  # the group of each entry in the previous selection
        places = []  # group x W_max + its place in that group (new beam j of BeamSearch.live)
        width = before.parents.shape[1]
        shared_blocks = []  # full blocks taken from the parent
        tail_blocks = []
        mid = []  # entries with a partly filled block to carry over
        slots: dict[int, tuple[int, int]] = {}  # sequence id -> (its group, its place in live)
        for k, i in enumerate(ahead):
            item = out.scheduled[i]
            seq = item.seq
            slot = slots.get(seq.seq_id)
            if slot is None:
                group = before.index(seq.request.request_id)
                assert group is not None, "launched ahead without its selection"
                slots.update((s.seq_id, (group, j)) for j, s in enumerate(seq.request.beam.live))
                slot = slots[seq.seq_id]
            groups.append(slot[0])
            places.append(slot[0] * width + slot[1])
            shared_blocks.append(item.start // bs)
            tail_blocks.append(item.beam_tail)
            if item.start % bs:
                mid.append(k)
        positions = [cu_seqlens[i] for i in ahead]
        # (decodes of beams only, in order: the input ids are the picked tokens as they are)
        only_beams = positions == list(range(n)) and cu_seqlens[-1] == n
        kernel = self.beam_ahead is not None and before.slot_tables is not None
        # one host->device copy for every index of the step ahead
        groups_t, places_t, shared, tails, positions_t, pick, entries, host_ids = to_device_lists(
            [
                [] if kernel else groups,
                places,
                shared_blocks,
                tail_blocks,
                [] if only_beams else positions,
                mid if len(mid) < n else [],
                ahead if n < len(out.scheduled) else [],
                [] if only_beams or isinstance(ids, torch.Tensor) else ids,
            ],
            self.device,
        )
        assert before.slot_tables is not None
        src: torch.Tensor | None = None  # each entry's parent's block at `shared` (mid entries only)
        if kernel:
            assert self.beam_ahead is not None
            device_ids = None
            if not only_beams:  # (the step's ids on the device, the tokens written in place)
                device_ids = ids.clone() if isinstance(ids, torch.Tensor) else host_ids
            tables, src, step_ids = self.beam_ahead(
                before.parents,
                before.tokens,
                before.slot_tables,
                places_t,
                shared,
                tails,
                max_blocks,
                device_ids,
                None if only_beams else positions_t,
            )
        else:
            # (take: one flat index into [G, W_max], whatever the strides; cheaper than a 2-D index)
            parents = before.parents.take(places_t)  # [n]
            tables = before.slot_tables[groups_t, parents]  # [n, w_prev] (a copy)
            # Each parent's table has its full blocks, then its partly filled block (at `shared`, in
            # the middle of a block), then zeros: beams of a request have the same length. So the
            # entry's table is its parent's with its tail at `shared`.
            if tables.shape[1] < max_blocks:
                tables = torch.nn.functional.pad(tables, (0, max_blocks - tables.shape[1]))
            elif tables.shape[1] > max_blocks:  # (a longer sequence of another request finished)
                tables = tables[:, :max_blocks].contiguous()  # (the kernels read contiguous tables)
            column = shared.view(n, 1)
            if mid:
                src = tables.gather(1, column).view(n).long()  # read before the tails replace them
            tables.scatter_(1, column, tails.view(n, 1).to(torch.int32))
            step_ids = before.tokens.take(places_t)  # [n] the picked tokens
            if not only_beams:
                device_ids = ids if isinstance(ids, torch.Tensor) else host_ids
                step_ids = device_ids.index_copy(0, positions_t, step_ids)
        if mid:  # every layer's K and V of those blocks in one copy (KVCache.copy_block_tensors)
            assert src is not None
            dst = tails
            if len(mid) < n:  # (some start a block: nothing to carry over for them)
                src, dst = src.index_select(0, pick), tails.index_select(0, pick)
            kv_cache.copy_block_tensors(src, dst)
        return AheadInputs(step_ids, tables, entries)
