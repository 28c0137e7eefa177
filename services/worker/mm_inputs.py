"""Images of a request inside the worker: where their placeholder tokens sit in the prompt, their
pixels, and the encoder cache that keeps each image's embeddings by content hash.

An image occupies `length` consecutive prompt positions from `offset` (the styler expanded its
placeholder to as many tokens as the vision tower yields rows). During prefill the model runner
swaps the input embeddings of those positions for the image's embedding rows (models/llava.py),
and the prefix cache keys those positions by the image hash (`cache_key_ids`), so two prompts
with the same token ids but different images never share KV blocks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from services.common.image_hash import pixels_hash
from services.worker.errors import InvalidRequestError
from tandem.v1 import common_pb2


@dataclass(frozen=True)
class ImageInput:
    hash: str  # hex content hash of the preprocessed pixels (the styler's sha256)
    offset: int  # first placeholder position in the prompt
    length: int  # number of placeholder positions (= embedding rows)
    # The HF processor's output for this image: [C, H, W] float32 (LLaVA), or Qwen2.5-VL's flat
    # patches [t * h * w, C * temporal_patch * patch * patch] on the grid `grid_thw`
    pixel_values: torch.Tensor
    grid_thw: tuple[int, ...] = ()  # (t, h, w) patches (Qwen2.5-VL); () for fixed-size towers

    @property
    def end(self) -> int:
        return self.offset + self.length


def cache_key_ids(prompt: list[int], images: tuple[ImageInput, ...]) -> list[int]:
    """The prompt's ids for prefix-cache keys: each image position becomes a negative id derived
    from the image hash and the position within the image (token ids are never negative)."""
    out = list(prompt)
    for image in images:
        base = int(image.hash[:15], 16)
        for k in range(image.length):
            out[image.offset + k] = -1 - ((base + k) % (1 << 60))
    return out


class EncoderCache:
    """Image embeddings by content hash, least recently used out past `max_entries`: the same
    image in a later turn (or another request) is not encoded again. `misses` counts the images
    encoded, `hits` those served from here (Info and /metrics report both)."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, image: ImageInput, encode: Callable[[ImageInput], torch.Tensor]) -> torch.Tensor:
        embeds = self._entries.get(image.hash)
        if embeds is not None:
            self._entries.move_to_end(image.hash)
            self.hits += 1
            return embeds
        self.misses += 1
        embeds = encode(image)
        self._entries[image.hash] = embeds
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return embeds


def images_from_pb(images: Iterable[common_pb2.ImageInput]) -> tuple[ImageInput, ...]:
    """The wire form (GenerateRequest.images) -> ImageInputs; a malformed one names its field."""
    out = []
    for i, msg in enumerate(images):
        where = f"images[{i}]"
        if msg.dtype != "float32":
            raise InvalidRequestError(
                f"{where}.dtype", f"only float32 pixels are supported, got {msg.dtype!r}"
            )
        shape = tuple(msg.shape)
        grid = tuple(msg.grid_thw)
        if len(shape) not in (2, 3) or len(msg.pixel_values) != 4 * math.prod(shape):
            raise InvalidRequestError(
                f"{where}.pixel_values",
                f"{len(msg.pixel_values)} bytes do not make float32 {list(shape)} ([C, H, W] or [patches, dim])",
            )
        if grid and (len(grid) != 3 or min(grid) <= 0):
            raise InvalidRequestError(f"{where}.grid_thw", f"{list(grid)} is not a (t, h, w) patch grid")
        # The hash keys the encoder cache and the prefix cache, shared by all requests: recompute
        # it (the styler's formula, services/styler/images.py pixels_hash) rather than trust it.
        if msg.hash != pixels_hash(shape, grid, msg.pixel_values):
            raise InvalidRequestError(
                f"{where}.hash", "is not the sha256 of the image's shape, grid and pixels"
            )
        pixels = torch.frombuffer(bytearray(msg.pixel_values), dtype=torch.float32).view(shape)
        out.append(ImageInput(msg.hash, msg.offset, msg.length, pixels, grid))
    return tuple(out)
