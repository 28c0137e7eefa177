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
  source is read before any destination is written, every layer in one copy). Returns the step's input ids and those entries' block tables on the device
  (`AheadInputs`).
- `select`, right after the sampler. Reads: the step's raw log-softmax rows, the beam requests
  whose live beams all sample in the step (`BeamSearch.group`), the block tables the step ran
  with, and for a step launched ahead the previous selection's `totals` (their cumulative
  logprobs, not on the host yet). Writes: nothing but the `BeamSelection` it returns, whose
  `slot_tables` (the tables each group's beams ran with) the next step ahead reads.

Every host index list of a call goes to the device in one copy (`beam_select.to_device_lists`):
the ops of a beam step do not grow with the beams, requests or layers (tests/worker/test_beam_step_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.beam_select import BeamSelection, select_beams, to_device_lists
from services.worker.kv_cache import KVCache
from services.worker.request import Sequence
from services.worker.scheduler import SchedulerOutput


@dataclass(frozen=True)
class AheadInputs:
    """A step launched ahead: what its beam entries read on the device."""

    ids: torch.Tensor  # [T] int64: the step's input ids, each entry ahead's its picked token
    tables: torch.Tensor  # [len(ahead), max_blocks] int32: the block tables of the entries ahead
    entries: torch.Tensor  # [len(ahead)] int64: those entries' indices in the scheduled batch


class BeamStep:
    """The beam-specific device work of the steps of one ModelRunner (module docstring)."""

    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device = device
        self.block_size = block_size

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
        seqs = [s for s, _ in rows]
        by_request: dict[str, dict[int, int]] = {}
        for r, seq in enumerate(seqs):
            if seq.request.beam is not None:
                by_request.setdefault(seq.request.request_id, {})[seq.seq_id] = r
        if not by_request:
            return None
        ahead = {item.seq.request.request_id for item in out.scheduled if item.beam_tail >= 0}
        groups = []
        for seq in seqs:
            mine = by_request.pop(seq.request.request_id, None)
            if mine is not None:
                group = seq.request.beam.group(mine, seq.request.request_id in ahead)
                if group is not None:
                    groups.append(group)
        if not groups:
            return None
        # the tables each group's live beams ran with, padded to W_max with its first beam's
        width = max(len(g.rows) for g in groups)
        entries: list[int] = []
        for g in groups:
            taken = [rows[r][1] for r in g.rows]
            entries += taken + [taken[0]] * (width - len(taken))
        # launched ahead: their cumulative logprobs are the previous selection's, on the device
        # (positions: their flat rows; sources: where in its totals)
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
        on_host = block_tables.device != self.device  # (a step not ahead, on CUDA)
        # one host->device copy for every index here
        entries_t, positions_t, sources_t = to_device_lists(
            [[] if on_host else entries, positions, sources], self.device
        )
        scores = None
        if sources:
            assert before is not None
            picked_scores = before.totals.view(-1).index_select(0, sources_t)
            if len(positions) == sum(len(g.rows) for g in groups):  # (all of them: the usual case)
                scores = picked_scores
            else:
                host = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float64)
                scores = host.to(self.device, non_blocking=True).index_copy(0, positions_t, picked_scores)
        selection = select_beams(raw, groups, scores)
        if on_host:
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
        width = before.parents.shape[1]
        # one pass over the entries (the lookups once per request, not a search per beam)
        flat = []  # (group, slot) of each entry in [G * W_max]
        shared_blocks = []  # full blocks taken from the parent
        tail_blocks = []
        mid = []  # entries with a partly filled block to carry over
        slots: dict[int, int] = {}  # sequence id -> its group's first flat slot + its place in live
        for k, i in enumerate(ahead):
            item = out.scheduled[i]
            seq = item.seq
            slot = slots.get(seq.seq_id)
            if slot is None:
                group = before.index(seq.request.request_id)
                assert group is not None, "launched ahead without its selection"
                slots.update((s.seq_id, group * width + j) for j, s in enumerate(seq.request.beam.live))
                slot = slots[seq.seq_id]
            flat.append(slot)
            shared_blocks.append(item.start // bs)
            tail_blocks.append(item.beam_tail)
            if item.start % bs:
                mid.append(k)
        # one host->device copy for every index of the step ahead
        where, shared, tails, positions, pick, entries, host_ids = to_device_lists(
            [
                flat,
                shared_blocks,
                tail_blocks,
                [cu_seqlens[i] for i in ahead],
                mid,
                ahead,
                [] if isinstance(ids, torch.Tensor) else ids,
            ],
            self.device,
        )
        parents = before.parents.view(-1).index_select(0, where)
        assert before.slot_tables is not None
        parent_tables = before.slot_tables[where // width, parents]  # [n, w_prev]
        if parent_tables.shape[1] < max_blocks:
            pad = parent_tables.new_zeros(len(ahead), max_blocks - parent_tables.shape[1])
            parent_tables = torch.cat([parent_tables, pad], dim=1)
        columns = torch.arange(max_blocks, device=self.device)
        tables = torch.where(columns[None, :] < shared[:, None], parent_tables[:, :max_blocks], 0)
        tables.scatter_(1, shared[:, None], tails[:, None].to(torch.int32))
        if mid:  # every layer's K and V of those blocks in one copy (KVCache.copy_block_tensors)
            src = parent_tables.gather(1, shared[:, None]).view(-1).long()  # each parent's partial block
            dst = tails
            if len(mid) < len(ahead):  # (some start a block: nothing to carry over for them)
                src, dst = src.index_select(0, pick), tails.index_select(0, pick)
            kv_cache.copy_block_tensors(src, dst)
        tokens = before.tokens.view(-1).index_select(0, where)
        device_ids = ids if isinstance(ids, torch.Tensor) else host_ids
        return AheadInputs(device_ids.index_copy(0, positions, tokens), tables, entries)
