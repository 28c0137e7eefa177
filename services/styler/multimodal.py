"""Image content parts of a chat for an image-in model (LLaVA): each image part becomes the model's
image placeholder token in the rendered prompt, its pixels are decoded and preprocessed
(images.py), and after tokenizing each placeholder is expanded to as many tokens as the vision
tower yields rows, which the worker replaces by the image's embeddings.

A model directory is image-in when its config.json has a `vision_config` and an
`image_token_index`; the placeholder's text is processor_config.json's `image_token` (LLaVA's
"<image>") or the tokenizer's text of that id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.styler.images import ClipPreprocessor, ImageError, PixelValues, data_url_bytes, decode_image
from services.styler.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptImage:
    """One image of a rendered prompt: its pixels and its placeholder tokens' span."""

    pixels: PixelValues
    offset: int
    length: int


@dataclass(frozen=True)
class ImageSupport:
    image_token: str
    image_token_id: int
    tokens_per_image: int
    preprocess: ClipPreprocessor

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
        token = str(processor.get("image_token") or tokenizer.id_to_token(token_id) or "")
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise ValueError(f"{model_dir}: the image token {token!r} does not tokenize to id {token_id}")
        patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        strategy = cfg.get("vision_feature_select_strategy", "default")
        tokens = patches if strategy == "default" else patches + 1
        return ImageSupport(token, token_id, tokens, ClipPreprocessor.from_model_dir(model_dir))

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
                parts.append({"type": "text", "text": self.image_token})
            out.append({**message, "content": parts})
        return out, pixels

    def expand(self, token_ids: list[int], pixels: list[PixelValues]) -> tuple[list[int], list[PromptImage]]:
        """Each placeholder token -> `tokens_per_image` of them; the images' spans."""
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
                images.append(PromptImage(pixels[len(images)], len(out), self.tokens_per_image))
                out += [token] * self.tokens_per_image
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
