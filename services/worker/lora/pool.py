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

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.linear import Linear
from services.worker.layers.lora import LoRAMapping, LoRAProjection
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
    """The projections every layer has, with their part widths (what an adapter must match)."""
    layers = decoder_projections(model)
    common = set.intersection(*(set(p) for p in layers)) if layers else set()
    shapes: dict[str, ProjectionShape] = {}
    first = layers[0] if layers else {}
    for name in common:
        proj = first[name]
        if name == "qkv_proj":
            attn = model.model.layers[0].self_attn  # type: ignore[union-attr,index]
            parts: tuple[int, ...] = (attn.q_size, attn.kv_size, attn.kv_size)
        elif name == "gate_up_proj":
            parts = (proj.out_features // 2,) * 2
        else:
            parts = (proj.out_features,)
        shapes[name] = ProjectionShape(proj.in_features, parts)
    # a module of a projection the model lacks (MoE MLPs) is rejected by the adapter's check
    return ModelShapes(len(layers), {n: shapes[n] for n in shapes}, hidden_size)


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
        # per layer: fused projection name -> its slice of the pool
        self.layers: list[dict[str, LoRAProjection]] = []
        for projections in decoder_projections(model):
            entry: dict[str, LoRAProjection] = {}
            for name, linear in projections.items():
                if name not in self.shapes.projections:
                    continue
                width = FUSED_PARTS[name] * max_rank
                a = torch.zeros(max_loras, width, linear.in_features, dtype=dtype, device=device)
                b = torch.zeros(max_loras, linear.out_features, width, dtype=dtype, device=device)
                parts = self.shapes.projections[name].part_out
                starts = tuple(sum(parts[:j]) for j in range(len(parts)))
                entry[name] = linear.lora = LoRAProjection(ops, a, b, self.mapping, starts, max_rank)
            self.layers.append(entry)
        self.slots: list[LoRAAdapter | None] = [None] * max_loras
        self._lru: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, least recently used first
        self.num_loads = 0  # slot fills (first loads and reloads after an eviction)

    def prepare(self, entries: list[tuple[LoRAAdapter | None, int]]) -> None:
        """Slots for this step's adapters (filling evicted ones), then the rows' mapping.
        `entries`: the step's scheduled sequences in row order, (adapter or None, rows it has)."""
        wanted: dict[int, LoRAAdapter] = {a.lora_id: a for a, _ in entries if a is not None}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"{len(wanted)} adapters in one step, the pool has {self.max_loras} slots")
        slot_of: dict[int, int] = {}
        for lora_id in wanted:
            if lora_id in self._lru:
                self._lru.move_to_end(lora_id)
                slot_of[lora_id] = self._lru[lora_id]
        for lora_id, adapter in wanted.items():
            if lora_id not in slot_of:
                slot_of[lora_id] = self._fill(adapter, busy=set(slot_of.values()))
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
        self.mapping.set(ids, starts, lens)

    def _fill(self, adapter: LoRAAdapter, busy: set[int]) -> int:
        free = [s for s, a in enumerate(self.slots) if a is None and s not in busy]
        if free:
            slot = free[0]
        else:
            victim = next(i for i, s in self._lru.items() if s not in busy)
            slot = self._lru.pop(victim)
            old = self.slots[slot]
            log.info("LoRA slot %d: evicting %r for %r", slot, old.name if old else None, adapter.name)
        self._write(slot, adapter)
        self.slots[slot] = adapter
        self._lru[adapter.lora_id] = slot
        self.num_loads += 1
        return slot

    @torch.inference_mode()
    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r_max = self.max_rank
        for layer, projections in enumerate(self.layers):
            for name, proj in projections.items():
                shape = self.shapes.projections[name]
                a = torch.zeros(proj.lora_a.shape[1:], dtype=torch.float32)
                b = torch.zeros(proj.lora_b.shape[1:], dtype=torch.float32)
                for module, (fused, part) in MODULES.items():
                    w = adapter.weights.get((layer, module)) if fused == name else None
                    if w is None:
                        continue
                    r = w.a.shape[0]
                    lo = sum(shape.part_out[:part])
                    a[part * r_max : part * r_max + r] = w.a
                    b[lo : lo + shape.part_out[part], part * r_max : part * r_max + r] = w.b
                proj.lora_a[slot].copy_(a, non_blocking=True)
                proj.lora_b[slot].copy_(b, non_blocking=True)
