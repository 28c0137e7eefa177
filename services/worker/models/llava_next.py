"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5's tower (CLIP or SigLIP),
projector and language model (models/llava.py), with "anyres" images.

The styler sends each image as its base tile plus the tiles of its grid pinpoint ([1 + tiles,
C, S, S], transformers' `LlavaNextImageProcessor`) and the original (height, width) in
`grid_thw` as (1, height, width). Every tile goes through the tower and projector; the base
tile's rows come first, then the grid's rows laid out as one feature map, its padding cut off
(the image's aspect ratio), with the learned `image_newline` row after each feature-map row
(transformers' `pack_image_features`; the geometry is services/common/anyres.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps
from services.common import anyres
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import ImageInput, check_embeddings
from services.worker.model_config import ModelConfig, ModelConfigError
from services.worker.models.llava import LlavaForConditionalGeneration, MultiModalProjector


class NextProjector(MultiModalProjector):
    """The projector and the `image_newline` row, one module so that the encode role (which
    materialises `unfused_prefixes` modules) carries the newline with the projector."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__(vision_hidden, text_hidden, act, bias)
        self.image_newline = nn.Parameter(torch.empty(text_hidden))


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    checkpoint_renames = (
        *LlavaForConditionalGeneration.checkpoint_renames,
        # transformers 5's in-memory name, then the saved / hub one: both into the projector
        ("model.image_newline", "image_newline"),
        ("image_newline", "multi_modal_projector.image_newline"),
    )
    projector_class = NextProjector
    multi_modal_projector: NextProjector

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        super().__init__(cfg, ops)
        mm = cfg.multimodal
        assert mm is not None  # (checked by LLaVA's constructor)
        vc = mm["vision_config"]
        self.tile = int(vc["image_size"])
        self.side = self.tile // int(vc["patch_size"])
        pinpoints = mm.get("image_grid_pinpoints") or [
            [336, 672],
            [672, 336],
            [672, 672],
            [1008, 336],
            [336, 1008],
        ]
        self.pinpoints = [(int(h), int(w)) for h, w in pinpoints]
        if any(h % self.tile or w % self.tile for h, w in self.pinpoints):
            raise ModelConfigError(f"{cfg.path}: image_grid_pinpoints must be multiples of {self.tile}")
        if self.tokens_per_tile() != self.side * self.side:
            raise ModelConfigError(
                f"{cfg.path}: vision_feature_select_strategy {self.select_strategy!r} leaves "
                f"{self.tokens_per_tile()} rows a tile, not {self.side}x{self.side} (a tower without CLS needs 'full')"
            )

    def image_tokens(self, height: int, width: int) -> int:
        return anyres.num_image_tokens(
            height, width, self.pinpoints, self.tile, self.side, self.tokens_per_tile()
        )

    def check_image(self, index: int, image: ImageInput) -> None:
        """The grid must be (1, height, width); pixels [1 + tiles, C, S, S] for that size and a
        placeholder run of its token count."""
        if len(image.grid_thw) != 3 or image.grid_thw[0] != 1:
            raise InvalidRequestError(
                f"images[{index}].grid_thw", f"{list(image.grid_thw)}; LLaVA-NeXT takes (1, height, width)"
            )
        _, height, width = image.grid_thw
        rows = self.image_tokens(height, width)
        if image.length != rows:
            raise InvalidRequestError(
                f"images[{index}].length", f"{image.length}; a {height}x{width} image is {rows} tokens"
            )
        if image.embeds is not None:
            check_embeddings(index, image, self.config.hidden_size)
            return
        tiles = anyres.num_tiles(height, width, self.pinpoints, self.tile)
        want = (tiles, self.vision_tower.embeddings.patch_embedding.in_channels, self.tile, self.tile)
        if tuple(image.pixel_values.shape) != want:
            raise InvalidRequestError(
                f"images[{index}].shape", f"{list(image.pixel_values.shape)}; this image takes {list(want)}"
            )

    @torch.no_grad()
    def encode_image(self, image: ImageInput) -> torch.Tensor:
        """[1 + tiles, C, S, S] pixels -> [tokens, text hidden], as transformers' LLaVA-NeXT
        `get_image_features` + `pack_image_features`."""
        _, height, width = image.grid_thw
        feats = self.project_tiles(image.pixel_values)  # [1 + tiles, side * side, hidden]
        base, grid = feats[0], feats[1:]
        rows, cols = anyres.grid_shape(height, width, self.pinpoints, self.tile)
        side = self.side
        fmap = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        top, bottom, left, right = anyres.unpadded(height, width, rows * side, cols * side)
        fmap = fmap[:, top:bottom, left:right]  # [hidden, H', W']
        newline = self.multi_modal_projector.image_newline.to(fmap.dtype)
        fmap = torch.cat((fmap, newline[:, None, None].expand(*fmap.shape[:-1], 1)), dim=-1)
        out = torch.cat((base, fmap.flatten(1, 2).transpose(0, 1)), dim=0)
        return out.to(self.model.embed_tokens.weight.dtype)
