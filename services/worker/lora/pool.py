"""The device pool of LoRA adapters: `--max-loras` slots of stacked weights per projection, filled
from the adapters' host copies on demand and recycled least recently used first.

A step asks `prepare(rows)` for the slots of its adapters (the scheduler never puts more distinct
adapters into one step than there are slots): an adapter already in a slot is a hit, another is
copied into the least recently used slot no row of this step needs (the evicted adapter stays in
host memory, adapter.py, and comes back the same way). The copies are in place, so the tensors
captured CUDA graphs read keep their addresses; on the device they are ordered after the steps
already queued, which may still read the old contents.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.linear import Linear
from services.worker.layers.lora import LoRAMapping, LoRAProjection, side_stream
from services.worker.lora.adapter import FUSED_PARTS, MODULES, LoRAAdapter, ModelShapes, ProjectionShape

log = logging.getLogger(__name__)

_ATTN = ("qkv_proj", "o_proj")
_MLP = ("gate_up_proj", "down_proj")


def decoder_projections(model: nn.Module) -> list[dict[str, Linear]]:
    """Per decoder layer, its fused projections by name (a MoE layer has no dense MLP ones)."""
    layers: list[dict[str, Linear]] = []
    for layer in model.model.layers:  # type: ignore[union-attr]
        found: dict[str, Linear] = {}
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for owner, names in ((attn, _ATTN), (mlp, _MLP)):
            for name in names:
                proj = getattr(owner, name, None)
                if isinstance(proj, Linear):
                    found[name] = proj
        layers.append(found)
    return layers


def model_shapes(model: nn.Module, hidden_size: int) -> ModelShapes:
    """The projections every layer has, with their part widths in the whole model (what an adapter
    must match) and, in a tensor- or pipeline-parallel group, this rank's slices and layers
    (services/worker/parallel.py ShardLayout)."""
    layers = decoder_projections(model)
    held = [i for i, p in enumerate(layers) if p]  # (a pipeline stage holds some layers only)
    common = set.intersection(*(set(layers[i]) for i in held)) if held else set()
    layout = getattr(model, "layout", None)
    tp_size, tp_rank = (layout.tp_size, layout.tp_rank) if layout is not None else (1, 0)
    shapes: dict[str, ProjectionShape] = {}
    for name in common:
        proj = layers[held[0]][name]
        # this rank's slice times T is the whole, except KV heads replicated over ranks (T > KV heads)
        if name == "qkv_proj":
            attn = model.model.layers[held[0]].self_attn  # type: ignore[union-attr,index]
            kv_whole = model.config.num_kv_heads * attn.head_dim  # type: ignore[union-attr]
            q_rows = (layout.q_head_start * attn.head_dim, attn.q_size) if layout else (0, attn.q_size)
            kv_rows = (layout.kv_head_start * attn.head_dim, attn.kv_size) if layout else (0, attn.kv_size)
            shapes[name] = ProjectionShape(
                proj.in_features,
                (attn.q_size * tp_size, kv_whole, kv_whole),
                _rows(tp_size, q_rows, kv_rows, kv_rows),
            )
        elif name == "gate_up_proj":
            inter = proj.out_features // 2
            shapes[name] = ProjectionShape(
                proj.in_features,
                (inter * tp_size,) * 2,
                _rows(tp_size, (tp_rank * inter, inter), (tp_rank * inter, inter)),
            )
        else:  # row-parallel: o_proj, down_proj
            cols = (tp_rank * proj.in_features, proj.in_features) if tp_size > 1 else None
            shapes[name] = ProjectionShape(proj.in_features * tp_size, (proj.out_features,), in_cols=cols)
    stage = (layout.layer_start, layout.layer_end) if layout is not None and layout.pp_size > 1 else None
    # a module of a projection the model lacks (MoE MLPs) is rejected by the adapter's check
    return ModelShapes(len(layers), shapes, hidden_size, stage)


def _rows(tp_size: int, *parts: tuple[int, int]) -> tuple[tuple[int, int], ...] | None:
    """Column-parallel parts' (first row, rows) of lora_B on this rank; None with T = 1 (all)."""
    return parts if tp_size > 1 else None


@dataclass(frozen=True)
class LoRAStep:
    """What one step needs of the pool, decided on rank 0 and replayed by the other ranks of a
    group (services/worker/tp_group.py Forward): the slots to refill, then the rows' mapping."""

    fills: tuple[tuple[int, int], ...]  # (slot, lora_id) to copy into the slot before the forward
    sorted_token_ids: list[int]  # the rows grouped by slot (layout: kernels/reference.py lora_segments)
    seg_starts: list[int]  # [S]
    seg_lens: list[int]  # [S]


class LoRAPool:
    def __init__(
        self,
        model: nn.Module,
        ops: KernelOps,
        max_loras: int,
        max_rank: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        hidden_size: int,
    ) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.shapes = model_shapes(model, hidden_size)
        self.mapping = LoRAMapping(max_loras, max_num_tokens, device)
        model.model.lora_mapping = self.mapping  # type: ignore[union-attr]
        # per layer: fused projection name -> its slice of the pool
        self.layers: list[dict[str, LoRAProjection]] = []
        # per layer: fused projection name -> the RMSNorm weight folded into its base weight (fp32,
        # host): a folded model's qkv / gate_up read the raw residual stream, so A carries it too
        # (A diag(g) h = A (g * h): the adapter then adds to the projection exactly as the base
        # weight does, in the folded forward and the plain one alike)
        self._input_scales: list[dict[str, torch.Tensor]] = []
        side = side_stream(device)  # (one for all: each projection joins it before the next forks)
        for projections in decoder_projections(model):
            entry: dict[str, LoRAProjection] = {}
            scales: dict[str, torch.Tensor] = {}
            for name, linear in projections.items():
                if name not in self.shapes.projections:
                    continue
                if linear.folded_norm is not None:
                    scales[name] = linear.folded_norm.detach().float().cpu()
                width = FUSED_PARTS[name] * max_rank  # A: the parts' ranks stacked; B: each column's own
                a = torch.zeros(max_loras, width, linear.in_features, dtype=dtype, device=device)
                b = torch.zeros(max_loras, linear.out_features, max_rank, dtype=dtype, device=device)
                parts = self.shapes.projections[name].local_part_out
                starts = tuple(sum(parts[:j]) for j in range(len(parts)))
                entry[name] = linear.lora = LoRAProjection(ops, a, b, self.mapping, starts, max_rank, side)
            self.layers.append(entry)
            self._input_scales.append(scales)
        self.slots: list[LoRAAdapter | None] = [None] * max_loras
        self._lru: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, least recently used first
        self.num_loads = 0  # slot fills (first loads and reloads after an eviction)

    def prepare(self, entries: list[tuple[LoRAAdapter | None, int]]) -> LoRAStep:
        """Slots for this step's adapters (filling evicted ones), then the rows' mapping.
        `entries`: the step's scheduled sequences in row order, (adapter or None, rows it has).
        Returns what the other ranks of a group replay (`apply`)."""
        wanted: dict[int, LoRAAdapter] = {a.lora_id: a for a, _ in entries if a is not None}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"{len(wanted)} adapters in one step, the pool has {self.max_loras} slots")
        slot_of: dict[int, int] = {}
        for lora_id in wanted:
            if lora_id in self._lru:
                self._lru.move_to_end(lora_id)
                slot_of[lora_id] = self._lru[lora_id]
        fills: list[tuple[int, int]] = []
        for lora_id, adapter in wanted.items():
            if lora_id not in slot_of:
                slot_of[lora_id] = self._take_slot(adapter, busy=set(slot_of.values()))
                fills.append((slot_of[lora_id], lora_id))
        # rows grouped by slot (layout: kernels/reference.py lora_segments), a range per sequence
        by_slot: list[list[int]] = [[] for _ in range(self.max_loras)]
        row = 0
        for entry_adapter, num_rows in entries:
            if entry_adapter is not None:
                by_slot[slot_of[entry_adapter.lora_id]] += range(row, row + num_rows)
            row += num_rows
        ids: list[int] = []
        starts: list[int] = []
        lens: list[int] = []
        for rows in by_slot:
            starts.append(len(ids))
            lens.append(len(rows))
            ids += rows
        step = LoRAStep(tuple(fills), ids, starts, lens)
        self.apply(step, wanted)
        return step

    def apply(self, step: LoRAStep, adapters: Mapping[int, LoRAAdapter]) -> None:
        """Copy the step's refilled slots from `adapters` (by lora_id), then write its mapping."""
        for slot, lora_id in step.fills:
            self._write(slot, adapters[lora_id])
            self.num_loads += 1
        self.mapping.set(step.sorted_token_ids, step.seg_starts, step.seg_lens)

    def _take_slot(self, adapter: LoRAAdapter, busy: set[int]) -> int:
        """A free slot, or the least recently used one no row of this step needs, for `adapter`."""
        free = [s for s, a in enumerate(self.slots) if a is None and s not in busy]
        if free:
            slot = free[0]
        else:
            victim = next(i for i, s in self._lru.items() if s not in busy)
            slot = self._lru.pop(victim)
            old = self.slots[slot]
            log.info("LoRA slot %d: evicting %r for %r", slot, old.name if old else None, adapter.name)
        self.slots[slot] = adapter
        self._lru[adapter.lora_id] = slot
        return slot

    @torch.inference_mode()
    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r_max = self.max_rank
        for layer, projections in enumerate(self.layers):
            for name, proj in projections.items():
                part_out = self.shapes.projections[name].local_part_out  # (this rank's slice)
                a = torch.zeros(proj.lora_a.shape[1:], dtype=torch.float32)
                b = torch.zeros(proj.lora_b.shape[1:], dtype=torch.float32)
                for module, (fused, part) in MODULES.items():
                    w = adapter.weights.get((layer, module)) if fused == name else None
                    if w is None:
                        continue
                    r = w.a.shape[0]
                    lo = sum(part_out[:part])
                    a[part * r_max : part * r_max + r] = w.a
                    b[lo : lo + part_out[part], :r] = w.b
                scale = self._input_scales[layer].get(name)
                if scale is not None:
                    a *= scale[None, :]
                proj.lora_a[slot].copy_(a, non_blocking=True)
                proj.lora_b[slot].copy_(b, non_blocking=True)
