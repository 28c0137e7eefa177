"""Qwen2.5-VL: a dynamic-resolution ViT (2D rotary, window attention with a few full-attention
layers, RMSNorm, SwiGLU), a patch merger (2 x 2 patches -> one language-model token), and a Qwen2
language model with multimodal rotary positions (M-RoPE, services/worker/mrope.py).

The language model is this class itself (a `Qwen2ForCausalLM` subclass: loader, kernels and
model runner treat it as a text model). The vision tower runs once per image, outside the
paged-attention path (`encode_image`, through the model runner's encoder cache or an encode
worker); its rows replace the image tokens' input embeddings during prefill, and those rows take
cos/sin rows of their own (`forward(..., mm=)`). Text tokens rotate at shifted 1D positions,
which the model runner computes (mrope.py), so decode steps are unchanged.

Matches transformers' `Qwen2_5_VLForConditionalGeneration` for still images (t = 1); both
checkpoint layouts (the hub's `visual.*` / `model.layers.*`, transformers 5's in-memory
`model.visual.*` / `model.language_model.*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kernels import KernelOps
from services.worker.errors import InvalidRequestError
from services.worker.layers.attention import AttentionMetadata
from services.worker.mm_inputs import ImageInput, check_embeddings
from services.worker.model_config import ModelConfig, ModelConfigError
from services.worker.models.clip import activation
from services.worker.models.llava import ImageEmbeddingRows
from services.worker.models.qwen2 import Qwen2ForCausalLM
from services.worker.mrope import mrope_cos_sin, section_of_columns


class VisionRMSNorm(nn.Module):
    """RMSNorm in float32, the weight applied in the input dtype (transformers' Qwen2RMSNorm)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass(frozen=True)
class Windows:
    """Segments of the (window-ordered) patch sequence that attend among themselves, padded to
    one length so that one attention call runs them all."""

    index: torch.Tensor  # [S, L] int64: the patch at each slot of each segment (padding: 0)
    valid: torch.Tensor  # [S, L] bool: the slots that hold a patch

    @staticmethod
    def of(lengths: list[int], device: torch.device) -> Windows:
        width = max(lengths)
        starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0)
        slots = torch.arange(width, device=device)
        valid = slots[None, :] < torch.tensor(lengths, device=device)[:, None]
        index = torch.where(valid, starts[:, None] + slots[None, :], 0)
        return Windows(index, valid)


def window_order(rows: int, cols: int, window: int) -> tuple[list[int], list[int]]:
    """transformers' `get_vision_window_index` for one still image of rows x cols merged patches
    and windows of `window` x `window` of them: the merged patches in window order (row-major
    windows, row-major within each) and the number of merged patches of each non-empty window."""
    order: list[int] = []
    sizes: list[int] = []
    for wr in range(0, rows, window):
        for wc in range(0, cols, window):
            cells = [
                r * cols + c
                for r in range(wr, min(wr + window, rows))
                for c in range(wc, min(wc + window, cols))
            ]
            order += cells
            sizes.append(len(cells))
    return order, sizes


class VisionAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: Windows | None
    ) -> torch.Tensor:  # x [N, hidden]; windows None: one segment (full attention)
        n, hidden = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, hidden // self.heads).unbind(1)  # [N, H, D] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if windows is None:  # (4D: the fused attention kernels take no 3D inputs)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)[0]
            return self.proj(out.transpose(0, 1).reshape(n, hidden))

        def segments(t: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [S, H, L, D]
            return t[windows.index].transpose(1, 2)

        mask = windows.valid[:, None, None, :]  # [S, 1, 1, L]: keys that exist
        out = F.scaled_dot_product_attention(segments(q), segments(k), segments(v), attn_mask=mask)
        return self.proj(out.transpose(1, 2)[windows.valid].reshape(n, hidden))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary over the whole head dim in float32 (rotate_half layout); cos/sin [N, D]."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.act = activation(act)
        self.gate_proj = nn.Linear(hidden, intermediate)
        self.up_proj = nn.Linear(hidden, intermediate)
        self.down_proj = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(vc["hidden_size"])
        self.norm1 = VisionRMSNorm(hidden)
        self.norm2 = VisionRMSNorm(hidden)
        self.attn = VisionAttention(hidden, int(vc.get("num_heads", vc.get("num_attention_heads", 16))))
        self.mlp = VisionMLP(hidden, int(vc["intermediate_size"]), str(vc.get("hidden_act", "silu")))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: Windows | None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, windows)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, temporal: int, patch: int, hidden: int) -> None:
        super().__init__()
        kernel = (temporal, patch, patch)
        self.proj = nn.Conv3d(channels, hidden, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # [N, C*t*p*p] -> [N, hidden]
        # The convolution covers each patch exactly once: a matrix product over its flat pixels.
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, out_hidden: int, hidden: int, merge: int) -> None:
        super().__init__()
        self.width = hidden * merge * merge
        self.ln_q = VisionRMSNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, out_hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N / merge², out_hidden]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    """Qwen2.5-VL's ViT for one still image: flat patches (the processor's, merge-window order)
    -> one row per merged patch, in the same order as the image's placeholder tokens."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(vc["hidden_size"])
        self.heads = int(vc.get("num_heads", vc.get("num_attention_heads", 16)))
        self.patch_size = int(vc.get("patch_size", vc.get("spatial_patch_size", 14)))
        self.temporal_patch_size = int(vc.get("temporal_patch_size", 2))
        self.channels = int(vc.get("in_channels", vc.get("in_chans", 3)))
        self.merge = int(vc.get("spatial_merge_size", 2))
        self.window = int(vc.get("window_size", 112)) // self.merge // self.patch_size
        self.full_attention = {int(i) for i in vc.get("fullatt_block_indexes", ())}
        self.rope_theta = float(
            (vc.get("rope_parameters") or {}).get("rope_theta", vc.get("rope_theta", 10000.0))
        )
        self.head_dim = hidden // self.heads
        self.patch_embed = PatchEmbed(self.channels, self.temporal_patch_size, self.patch_size, hidden)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(int(vc["depth"])))
        self.merger = PatchMerger(int(vc["out_hidden_size"]), hidden, self.merge)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def forward(self, patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        m, unit = self.merge, self.merge * self.merge
        rows, cols = grid_h // m, grid_w // m
        device = patches.device
        x = self.patch_embed(patches)  # [N, hidden], merge-window order
        # Each patch's (h, w) in the processor's order: merge windows row-major, then within one.
        r, c, i, j = torch.meshgrid(
            torch.arange(rows), torch.arange(cols), torch.arange(m), torch.arange(m), indexing="ij"
        )
        hw = torch.stack([(r * m + i).flatten(), (c * m + j).flatten()], dim=-1).to(device)  # [N, 2]
        order, sizes = window_order(rows, cols, self.window)
        unit_order = torch.tensor(order, device=device)
        # Window order: merged patches window by window (each keeps its m x m patches together).
        patch_order = (unit_order[:, None] * unit + torch.arange(unit, device=device)).flatten()
        x, hw = x[patch_order], hw[patch_order]
        spatial = self.head_dim // 2  # h and w each rotate half of the head's frequency pairs
        # (computed here, not a buffer: the model is built on the meta device, buffers included)
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial)
        freqs = (hw[..., None].float() * inv_freq.to(device)).flatten(1)  # [N, D/2]: h's then w's
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        windows = Windows.of([s * unit for s in sizes], device)
        for k, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if k in self.full_attention else windows)
        merged = self.merger(x)  # [rows * cols, out_hidden], window order
        return merged[torch.argsort(unit_order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    # HF's checkpoint names -> ours (the language model is this module itself)
    checkpoint_renames = (
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
    )
    # Parameters the loader copies as they are (the tower's qkv is fused already, its MLP is not)
    unfused_prefixes = ("visual.",)

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        mm = cfg.multimodal
        if mm is None or not isinstance(mm.get("vision_config"), dict):
            raise ModelConfigError(f"{cfg.path}: a Qwen2.5-VL config needs vision_config")
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ModelConfigError(
                f"{cfg.path}: mrope_section {list(cfg.mrope_section)} does not cover head_dim {cfg.head_dim}"
            )
        self.image_token_id = int(mm.get("image_token_id", 151655))
        super().__init__(cfg, ops)
        self.visual = VisionTransformer(dict(mm["vision_config"]))
        self.mrope_columns: torch.Tensor | None = None  # mrope.section_of_columns, on the device

    @property
    def spatial_merge_size(self) -> int:
        return self.visual.merge

    def check_image(self, index: int, image: ImageInput) -> None:
        """Refuse a grid, pixel shape or placeholder count the tower cannot take (any of them
        would fail inside a forward, costing the whole batch)."""
        m = self.visual.merge
        grid = image.grid_thw
        if len(grid) != 3 or grid[0] != 1 or grid[1] % m or grid[2] % m:
            raise InvalidRequestError(
                f"images[{index}].grid_thw",
                f"{list(grid)}; this model takes still images of (1, h, w) patches, h and w multiples of {m}",
            )
        tokens = math.prod(grid) // (m * m)
        if image.length != tokens:
            raise InvalidRequestError(
                f"images[{index}].length", f"{image.length}; this image is {tokens} tokens"
            )
        if image.embeds is not None:  # encoded by an encode worker
            check_embeddings(index, image, self.config.hidden_size)
            return
        want = (math.prod(grid), self.visual.patch_dim)
        if tuple(image.pixel_values.shape) != want:
            raise InvalidRequestError(
                f"images[{index}].shape", f"{list(image.pixel_values.shape)}; this image takes {list(want)}"
            )

    @torch.no_grad()
    def encode_image(self, image: ImageInput) -> torch.Tensor:
        """Flat patches of one image -> [tokens, text hidden], in its placeholder tokens' order."""
        device = self.visual.merger.ln_q.weight.device
        _, grid_h, grid_w = image.grid_thw
        embeds = self.visual(image.pixel_values.to(device), grid_h, grid_w)
        return embeds.to(self.model.embed_tokens.weight.dtype)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, mm: ImageEmbeddingRows | None = None
    ) -> torch.Tensor:
        if mm is None:
            return super().forward(input_ids, meta)
        assert mm.rope_positions is not None, "the model runner gives image rows their M-RoPE positions"
        if self.mrope_columns is None:
            self.mrope_columns = section_of_columns(self.config.mrope_section, input_ids.device)
        # Every token of this step gets its own cos/sin row: text tokens the table's row at their
        # (shifted) position, image tokens rows mixed from their three positions.
        table = meta.cos_sin_cache.index_select(0, meta.positions)
        table = table.index_copy(
            0, mm.rows, mrope_cos_sin(meta.cos_sin_cache, mm.rope_positions, self.mrope_columns)
        )
        meta = replace(
            meta, positions=torch.arange(input_ids.shape[0], device=input_ids.device), cos_sin_cache=table
        )
        embeds = self.model.embed_tokens(input_ids).index_copy(0, mm.rows, mm.embeds)
        return self.model(input_ids, meta, inputs_embeds=embeds)
