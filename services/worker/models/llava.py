"""LLaVA-1.5 style image-in models: a CLIP (or SigLIP: models/siglip.py) vision tower, a two-layer
MLP projector, and a language model of an existing text family (Llama / Mistral / Qwen2 / Qwen3,
from config.json's text_config).

The language model is this class itself (a `LlamaForCausalLM` subclass, so the loader, norm
folding and the model runner treat it as any text model); the vision tower and projector are
plain torch modules run once per image, outside the paged-attention path. An image becomes
`num_image_tokens` embedding rows which replace the input embeddings of its placeholder tokens
during prefill (`forward(..., mm=)`, filled by the model runner from the request's images).

Matches transformers' `LlavaForConditionalGeneration` with `vision_feature_select_strategy`
"default" (the first row dropped: CLIP's CLS; a SigLIP tower has none and loses its first patch,
as in transformers) or "full", one integer `vision_feature_layer`. LLaVA-NeXT (anyres tiling)
builds on this class: models/llava_next.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import KernelOps
from services.worker.errors import InvalidRequestError
from services.worker.layers.attention import AttentionMetadata
from services.worker.mm_inputs import ImageInput, check_embeddings
from services.worker.model_config import ModelConfig, ModelConfigError
from services.worker.models.clip import ClipVisionTower, activation
from services.worker.models.llama import LlamaForCausalLM
from services.worker.models.siglip import SiglipVisionTower


@dataclass(frozen=True)
class ImageEmbeddingRows:
    """Embedding rows to put in place of token embeddings in one forward: `rows[i]` of the
    flattened step takes `embeds[i]`."""

    rows: torch.Tensor  # [N] int64, on the model's device
    embeds: torch.Tensor  # [N, hidden]
    # M-RoPE models (Qwen2.5-VL): the rows' (temporal, height, width) positions, services/worker/mrope.py
    rope_positions: torch.Tensor | None = None  # [3, N] int64, on the model's device


def build_vision_tower(path: str, vc: dict[str, Any]) -> ClipVisionTower | SiglipVisionTower:
    """The tower `vision_config.model_type` names (CLIP when absent, as transformers' default)."""
    kind = vc.get("model_type", "clip_vision_model")
    if kind == "clip_vision_model":
        return ClipVisionTower(vc)
    if kind == "siglip_vision_model":
        return SiglipVisionTower(vc)
    raise ModelConfigError(f"{path}: vision tower {kind!r} is not supported (CLIP or SigLIP)")


class MultiModalProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(LlamaForCausalLM):
    # HF's checkpoint names -> ours: the language model is this module itself
    # (both layouts: transformers 5's in-memory names and the saved / llava-hf hub names)
    checkpoint_renames: tuple[tuple[str, str], ...] = (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    # Parameters the loader copies as they are (CLIP's q/k/v are not fused like the text layers')
    unfused_prefixes = ("vision_tower.", "multi_modal_projector.")
    projector_class = MultiModalProjector
    vision_tower: ClipVisionTower | SiglipVisionTower

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        mm = cfg.multimodal
        if mm is None:
            raise ModelConfigError(f"{cfg.path}: a LLaVA config needs text_config and vision_config")
        vc = dict(mm["vision_config"])
        feature_layer = mm.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ModelConfigError(f"{cfg.path}: a list of vision_feature_layer is not supported")
        self.feature_layer = feature_layer
        self.select_strategy = str(mm.get("vision_feature_select_strategy", "default"))
        if self.select_strategy not in ("default", "full"):
            raise ModelConfigError(f"{cfg.path}: vision_feature_select_strategy {self.select_strategy!r}")
        self.image_token_id = int(mm.get("image_token_index", mm.get("image_token_id", 32000)))
        super().__init__(cfg, ops)
        self.vision_tower = build_vision_tower(cfg.path, vc)
        self.multi_modal_projector = self.projector_class(
            int(vc["hidden_size"]),
            cfg.hidden_size,
            str(mm.get("projector_hidden_act", "gelu")),
            bool(mm.get("multimodal_projector_bias", True)),
        )

    def check_image(self, index: int, image: ImageInput) -> None:
        """Refuse pixels of another shape than the vision tower's, or a placeholder run of another
        length than its rows (either would fail inside a forward, costing the whole batch)."""
        emb = self.vision_tower.embeddings
        rows = self.tokens_per_tile()
        if image.length != rows:
            raise InvalidRequestError(
                f"images[{index}].length", f"{image.length}; this model's images are {rows} tokens"
            )
        if image.embeds is not None:  # encoded by an encode worker
            check_embeddings(index, image, self.config.hidden_size)
            return
        size = emb.image_size
        want = (emb.patch_embedding.in_channels, size, size)
        if tuple(image.pixel_values.shape) != want:
            raise InvalidRequestError(
                f"images[{index}].shape", f"{list(image.pixel_values.shape)}; this model takes {list(want)}"
            )

    def tokens_per_tile(self) -> int:
        """Rows of one tower input after feature selection ("default" drops the first row)."""
        return int(self.vision_tower.embeddings.num_positions) - (
            1 if self.select_strategy == "default" else 0
        )

    @torch.no_grad()
    def project_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] tower inputs -> [B, tokens_per_tile, text hidden] (the projector's output)."""
        device = self.vision_tower.embeddings.patch_embedding.weight.device
        feats = self.vision_tower(pixels.to(device), self.feature_layer)
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    @torch.no_grad()
    def encode_image(self, image: ImageInput) -> torch.Tensor:
        """[C, H, W] pixels (the processor's output for one image) -> [tokens, text hidden]."""
        return self.project_tiles(image.pixel_values[None])[0].to(self.model.embed_tokens.weight.dtype)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, mm: ImageEmbeddingRows | None = None
    ) -> torch.Tensor:
        if mm is None:
            return self.model(input_ids, meta)
        embeds = self.model.embed_tokens(input_ids).index_copy(0, mm.rows, mm.embeds)
        return self.model(input_ids, meta, inputs_embeds=embeds)
