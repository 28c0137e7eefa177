"""Images of a request inside the worker: where their placeholder tokens sit in the prompt, their
pixels, and the encoder cache that keeps each image's embeddings by content hash.

An image occupies `length` consecutive prompt positions from `offset` (the styler expanded its
placeholder to as many tokens as the vision tower yields rows). During prefill the model runner
swaps the input embeddings of those positions for the image's embedding rows (models/llava.py),
and the prefix cache keys those positions by the image hash (`cache_key_ids`), so two prompts
with the same token ids but different images never share KV blocks.

An image may also come as its hash alone (`by_hash`: no pixels, no rows) when the caller has sent
it to this worker before. Admission (`EncoderCache.admit`, on the engine thread) resolves it to
the embeddings this worker holds for that hash, or to the pixels / rows of a running request that
carries it and may not have been encoded yet; the request keeps a reference to what it got, so an
eviction between admission and the forward cannot take it away. A hash the worker
does not hold is `ImageNotCachedError` (gRPC FAILED_PRECONDITION naming `images[i].hash`): the
caller resends the pixels. Taking the hash on trust is safe: the cache only holds hashes this
worker computed itself from the bytes it was sent.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from services.common.image_hash import IMAGE_NOT_CACHED, embeddings_hash, pixels_hash
from services.worker.errors import ImageNotCachedError, InvalidRequestError
from tandem.v1 import common_pb2


@dataclass(frozen=True)
class ImageInput:
    hash: str  # hex content hash of the preprocessed pixels (the styler's sha256)
    offset: int  # first placeholder position in the prompt
    length: int  # number of placeholder positions (= embedding rows)
    # The HF processor's output for this image: [C, H, W] float32 (LLaVA), LLaVA-NeXT's base +
    # grid tiles [1 + tiles, C, S, S], or Qwen2.5-VL's flat patches
    # [t * h * w, C * temporal_patch * patch * patch] on the grid `grid_thw`
    pixel_values: torch.Tensor
    # (t, h, w) patches (Qwen2.5-VL); (1, height, width) pixels of the original image
    # (LLaVA-NeXT: its tiling and unpadding); () for fixed-size towers
    grid_thw: tuple[int, ...] = ()
    # The embedding rows an encode worker computed ([length, hidden]); then pixel_values is empty
    # and `hash` is the rows' own (services/common/image_hash.py embeddings_hash)
    embeds: torch.Tensor | None = None
    # Sent as its hash alone (neither pixels nor rows): EncoderCache.admit resolves it
    by_hash: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def num_bytes(self) -> int:
        """Bytes of pixels or rows this image carried on the wire."""
        data = self.embeds if self.embeds is not None else self.pixel_values
        return data.numel() * data.element_size()


def cache_key_ids(prompt: list[int], images: tuple[ImageInput, ...]) -> list[int]:
    """The prompt's ids for prefix-cache keys: each image position becomes a negative id derived
    from the image hash and the position within the image (token ids are never negative)."""
    out = list(prompt)
    for image in images:
        base = int(image.hash[:15], 16)
        for k in range(image.length):
            out[image.offset + k] = -1 - ((base + k) % (1 << 60))
    return out


@dataclass(frozen=True)
class CachedImage:
    embeds: torch.Tensor  # [length, hidden] on the worker's device, in the model dtype
    grid_thw: tuple[int, ...]  # the grid it was encoded on (a hash-only image must name the same)


class EncoderCache:
    """Image embeddings by content hash, least recently used out past `max_entries`: the same
    image in a later turn (or another request) is not encoded again, and may be sent as its hash
    alone (`admit`). Counters since start (Info and /metrics report them): `misses` the images
    encoded, `hits` those served from here (hash-only images included), `by_hash` the hash-only
    images admitted, `hash_misses` those refused as unknown, `bytes_received` the pixel and row
    bytes of admitted images."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.by_hash = 0
        self.hash_misses = 0
        self.bytes_received = 0

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def get(self, image: ImageInput, encode: Callable[[ImageInput], torch.Tensor]) -> torch.Tensor:
        entry = self._entries.get(image.hash)
        if entry is not None:
            self._entries.move_to_end(image.hash)
            self.hits += 1
            return entry.embeds
        self.misses += 1
        embeds = encode(image)
        self.put(image.hash, embeds, image.grid_thw)
        return embeds

    def put(self, digest: str, embeds: torch.Tensor, grid_thw: tuple[int, ...]) -> None:
        """Keep `embeds` (an image's rows: encoded here or an encode worker's) under `digest`."""
        self._entries[digest] = CachedImage(embeds, grid_thw)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def admit(
        self, images: tuple[ImageInput, ...], live: Iterable[ImageInput] = ()
    ) -> tuple[ImageInput, ...]:
        """A request's images as it will run them: each hash-only image resolved to the
        embeddings held here, or else to the pixels / rows of one of the `live` images (those of
        the requests admitted and not finished: one may carry it, not encoded yet). Raises
        ImageNotCachedError (`images[i].hash`) for a hash held nowhere, and InvalidRequestError
        (`images[i].grid_thw`) for a grid other than the image's."""
        out = []
        running: list[ImageInput] | None = None  # `live`, read at the first hash not held here
        for i, image in enumerate(images):
            if not image.by_hash:
                self.bytes_received += image.num_bytes
                out.append(image)
                continue
            entry = self._entries.get(image.hash)
            if entry is not None:
                self._check_grid(i, image, entry.grid_thw)
                self._entries.move_to_end(image.hash)
                self.by_hash += 1
                self.hits += 1
                out.append(replace(image, embeds=entry.embeds, by_hash=False))
                continue
            running = list(live) if running is None else running
            held = next((x for x in running if x.hash == image.hash and not x.by_hash), None)
            if held is None:
                self.hash_misses += 1
                raise ImageNotCachedError(f"images[{i}].hash", IMAGE_NOT_CACHED)
            self._check_grid(i, image, held.grid_thw)
            self.by_hash += 1
            out.append(replace(image, pixel_values=held.pixel_values, embeds=held.embeds, by_hash=False))
        return tuple(out)

    @staticmethod
    def _check_grid(index: int, image: ImageInput, grid: tuple[int, ...]) -> None:
        if image.grid_thw != grid:
            raise InvalidRequestError(
                f"images[{index}].grid_thw",
                f"{list(image.grid_thw)}; the image of this hash is on {list(grid)}",
            )


# Wire names of embedding dtypes (ImageInput.embeddings_dtype)
EMBEDDING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in EMBEDDING_DTYPES.items() if d == dtype)


def embedding_bytes(embeds: torch.Tensor) -> bytes:
    """The rows' little-endian bytes in their own dtype (bfloat16 has no numpy type: viewed as int16)."""
    flat = embeds.detach().to("cpu").contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return bytes(flat.numpy().tobytes())


def with_embeddings(image: ImageInput, embeds: torch.Tensor) -> ImageInput:
    """`image` carrying `embeds` (an encode worker's output) instead of its pixels, keyed by the
    embeddings' own hash."""
    embeds = embeds.detach().to("cpu").contiguous()
    digest = embeddings_hash(tuple(embeds.shape), dtype_name(embeds.dtype), embedding_bytes(embeds))
    return replace(image, hash=digest, pixel_values=torch.empty(0), embeds=embeds)


def check_embeddings(index: int, image: ImageInput, hidden: int) -> None:
    """An encode worker's rows must be one per placeholder token, of the language model's width."""
    assert image.embeds is not None
    if tuple(image.embeds.shape) != (image.length, hidden):
        raise InvalidRequestError(
            f"images[{index}].embeddings_shape",
            f"{list(image.embeds.shape)}; this image takes [{image.length}, {hidden}]",
        )


def _embeddings_from_pb(where: str, msg: common_pb2.ImageInput) -> torch.Tensor:
    dtype = EMBEDDING_DTYPES.get(msg.embeddings_dtype)
    if dtype is None:
        raise InvalidRequestError(
            f"{where}.embeddings_dtype", f"{msg.embeddings_dtype!r}; one of {', '.join(EMBEDDING_DTYPES)}"
        )
    shape = tuple(msg.embeddings_shape)
    if len(shape) != 2 or len(msg.embeddings) != dtype.itemsize * math.prod(shape):
        raise InvalidRequestError(
            f"{where}.embeddings",
            f"{len(msg.embeddings)} bytes do not make {msg.embeddings_dtype} {list(shape)}",
        )
    if msg.hash != embeddings_hash(shape, msg.embeddings_dtype, msg.embeddings):
        raise InvalidRequestError(f"{where}.hash", "is not the sha256 of the image's embeddings")
    return torch.frombuffer(bytearray(msg.embeddings), dtype=dtype).view(shape)


def image_to_pb(image: ImageInput) -> common_pb2.ImageInput:
    """An ImageInput on the wire: its embeddings when it has them, else its float32 pixels (its
    hash alone when `by_hash`)."""
    msg = common_pb2.ImageInput(
        hash=image.hash, offset=image.offset, length=image.length, grid_thw=list(image.grid_thw)
    )
    if image.by_hash:
        return msg
    if image.embeds is not None:
        msg.embeddings = embedding_bytes(image.embeds)
        msg.embeddings_shape.extend(image.embeds.shape)
        msg.embeddings_dtype = dtype_name(image.embeds.dtype)
    else:
        msg.pixel_values = image.pixel_values.contiguous().numpy().astype("<f4").tobytes()
        msg.shape.extend(image.pixel_values.shape)
        msg.dtype = "float32"
    return msg


def images_from_pb(images: Iterable[common_pb2.ImageInput]) -> tuple[ImageInput, ...]:
    """The wire form (GenerateRequest.images) -> ImageInputs; a malformed one names its field."""
    out = []
    for i, msg in enumerate(images):
        where = f"images[{i}]"
        grid = tuple(msg.grid_thw)
        if grid and (len(grid) != 3 or min(grid) <= 0):
            raise InvalidRequestError(f"{where}.grid_thw", f"{list(grid)} is not a (t, h, w) patch grid")
        if not (msg.pixel_values or msg.shape or msg.embeddings or msg.embeddings_shape):
            # Hash only: the worker resolves it at admission (EncoderCache.admit)
            if not _is_sha256_hex(msg.hash):
                raise InvalidRequestError(
                    f"{where}.hash", "an image without pixels or embeddings needs its sha256 hex hash"
                )
            out.append(ImageInput(msg.hash, msg.offset, msg.length, torch.empty(0), grid, by_hash=True))
            continue
        if msg.embeddings:
            embeds = _embeddings_from_pb(where, msg)
            out.append(ImageInput(msg.hash, msg.offset, msg.length, torch.empty(0), grid, embeds))
            continue
        if msg.dtype != "float32":
            raise InvalidRequestError(
                f"{where}.dtype", f"only float32 pixels are supported, got {msg.dtype!r}"
            )
        shape = tuple(msg.shape)
        if len(shape) not in (2, 3, 4) or len(msg.pixel_values) != 4 * math.prod(shape):
            raise InvalidRequestError(
                f"{where}.pixel_values",
                f"{len(msg.pixel_values)} bytes do not make float32 {list(shape)} ([C, H, W], [tiles, C, H, W] or [patches, dim])",
            )
        # The hash keys the encoder cache and the prefix cache, shared by all requests: recompute
        # it (the styler's formula, services/styler/images.py pixels_hash) rather than trust it.
        if msg.hash != pixels_hash(shape, grid, msg.pixel_values):
            raise InvalidRequestError(
                f"{where}.hash", "is not the sha256 of the image's shape, grid and pixels"
            )
        pixels = torch.frombuffer(bytearray(msg.pixel_values), dtype=torch.float32).view(shape)
        out.append(ImageInput(msg.hash, msg.offset, msg.length, pixels, grid))
    return tuple(out)


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
