"""Image content parts of a chat for an image-in model (LLaVA, Qwen2.5-VL): each image part
becomes the model's placeholder text in the rendered prompt, its pixels are decoded and
preprocessed (images.py), and after tokenizing each image token is expanded to as many tokens as
the vision tower yields rows, which the worker replaces by the image's embeddings.

A model directory is image-in when its config.json has a `vision_config` and an
`image_token_index` / `image_token_id`. LLaVA: the placeholder is processor_config.json's
`image_token` ("<image>") or the tokenizer's text of that id, every image the same number of
tokens, or for LLaVA-NeXT as many as its anyres tiling yields for that image's size. Qwen2.5-VL: the placeholder is `<|vision_start|><|image_pad|><|vision_end|>` (what its
chat template writes for an image part), and `<|image_pad|>` is expanded to one token per merged
patch of that image's dynamic-resolution grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common import anyres
from services.styler.images import (
    ClipPreprocessor,
    ImageError,
    LlavaNextPreprocessor,
    PixelValues,
    QwenVLPreprocessor,
    data_url_bytes,
    decode_image,
)
from services.styler.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptImage:
    """One image of a rendered prompt: its pixels and its placeholder tokens' span."""

    pixels: PixelValues
    offset: int
    length: int


# Qwen2.5-VL's image markers (its chat template writes all three for an image part)
QWEN_VISION_START = "<|vision_start|>"
QWEN_VISION_END = "<|vision_end|>"
QWEN_IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class ImageSupport:
    placeholder: str  # the text an image part becomes before the chat template runs
    image_token: str  # the token expanded to the image's rows (in `placeholder`)
    image_token_id: int
    preprocess: ClipPreprocessor | LlavaNextPreprocessor | QwenVLPreprocessor
    # fixed-size towers (LLaVA); LLaVA-NeXT: the base tile's; 0 for Qwen2.5-VL (from each grid)
    tokens_per_image: int = 0
    # LLaVA-NeXT: the model's (config.json) grid pinpoints, tile size and features per tile side
    pinpoints: tuple[tuple[int, int], ...] = ()
    tile: int = 0
    side: int = 0

    @staticmethod
    def from_model_dir(model_dir: str, tokenizer: Tokenizer) -> ImageSupport | None:
        """None for a text-only model; ValueError for an image-in model this styler cannot serve."""
        root = Path(model_dir)
        try:
            cfg = json.loads((root / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict) or ("image_token_index" not in cfg and "image_token_id" not in cfg):
            return None
        token_id = int(cfg.get("image_token_index", cfg.get("image_token_id", 0)))
        processor: dict[str, Any] = {}
        if (root / "processor_config.json").is_file():
            processor = json.loads((root / "processor_config.json").read_text())
        if cfg.get("model_type") == "qwen2_5_vl":
            token = str(processor.get("image_token") or QWEN_IMAGE_PAD)
            support = ImageSupport(
                QWEN_VISION_START + token + QWEN_VISION_END,
                token,
                token_id,
                QwenVLPreprocessor.from_model_dir(model_dir),
            )
            markers: tuple[str, ...] = (QWEN_VISION_START, QWEN_VISION_END, token)
        else:
            token = str(processor.get("image_token") or tokenizer.id_to_token(token_id) or "")
            side = int(vision["image_size"]) // int(vision["patch_size"])
            # the tower's rows (SigLIP has no CLS row); "default" drops the first, as transformers
            cls = 0 if vision.get("model_type") == "siglip_vision_model" else 1
            strategy = cfg.get("vision_feature_select_strategy", "default")
            tokens = side * side + cls - (1 if strategy == "default" else 0)
            if "LlavaNextForConditionalGeneration" in (cfg.get("architectures") or []):
                pinpoints = cfg.get("image_grid_pinpoints") or [
                    [336, 672],
                    [672, 336],
                    [672, 672],
                    [1008, 336],
                    [336, 1008],
                ]
                support = ImageSupport(
                    token, token, token_id, LlavaNextPreprocessor.from_model_dir(model_dir), tokens,
                    tuple((int(h), int(w)) for h, w in pinpoints), int(vision["image_size"]), side,
                )  # fmt: skip
            else:
                support = ImageSupport(
                    token, token, token_id, ClipPreprocessor.from_model_dir(model_dir), tokens
                )
            markers = (token,)
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise ValueError(f"{model_dir}: the image token {token!r} does not tokenize to id {token_id}")
        for marker in markers:
            if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
                raise ValueError(f"{model_dir}: the tokenizer has no {marker!r} token")
        return support

    def num_tokens(self, pixels: PixelValues) -> int:
        if isinstance(self.preprocess, QwenVLPreprocessor):
            return self.preprocess.num_tokens(pixels)
        if isinstance(self.preprocess, LlavaNextPreprocessor):
            _, height, width = pixels.grid_thw
            return anyres.num_image_tokens(
                height, width, self.pinpoints, self.tile, self.side, self.tokens_per_image
            )
        return self.tokens_per_image

    def prepare(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[PixelValues]]:
        """Messages with each image part replaced by a text part holding the placeholder, and the
        images' pixels in order. ImageError names the part (`messages[i].content[j]`)."""
        out: list[dict[str, Any]] = []
        pixels: list[PixelValues] = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list) or not any(p.get("type") == "image_url" for p in content):
                out.append(dict(message))
                continue
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "image_url":
                    parts.append(part)
                    continue
                try:
                    pixels.append(self.preprocess(decode_image(data_url_bytes(image_url_of(part)))))
                except ImageError as exc:
                    raise ImageError(f"messages[{i}].content[{j}]: {exc}") from None
                parts.append({"type": "text", "text": self.placeholder})
            out.append({**message, "content": parts})
        return out, pixels

    def expand(self, token_ids: list[int], pixels: list[PixelValues]) -> tuple[list[int], list[PromptImage]]:
        """Each image token -> as many as the image has rows; the images' spans."""
        found = token_ids.count(self.image_token_id)
        if found != len(pixels):
            raise ImageError(
                f"messages: the prompt has {found} image placeholder tokens ({self.image_token!r}) for "
                f"{len(pixels)} images; the text may not contain the placeholder itself"
            )
        out: list[int] = []
        images: list[PromptImage] = []
        for token in token_ids:
            if token == self.image_token_id:
                image = pixels[len(images)]
                images.append(PromptImage(image, len(out), self.num_tokens(image)))
                out += [token] * images[-1].length
            else:
                out.append(token)
        return out, images


def image_url_of(part: Mapping[str, Any]) -> str:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise ImageError("an image_url part needs image_url.url")
    return url


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )
