"""Images in: decode a data URL's bytes with Pillow under explicit limits, and preprocess them
exactly as the model's Hugging Face image processor does, without importing transformers.

LLaVA-1.5's `CLIPImageProcessor` (its PIL backend, which is what transformers runs without
torchvision): RGB, resize so the shortest edge is `size.shortest_edge` (the long edge
`int(short * long / short)`, PIL bicubic on uint8), center crop, rescale (float64 * factor, then
float32), normalise with float32 mean / std, channels first. The settings come from the model
directory's preprocessor_config.json (`ClipPreprocessor.from_model_dir`).

Memory is bounded before any pixel is decoded: the encoded bytes (`MAX_IMAGE_BYTES`) and the
header's width x height (`MAX_IMAGE_PIXELS`) are checked first, so a small file that declares a
100-megapixel image costs nothing. The work is CPU-bound: callers run it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.common import anyres
from services.common.image_hash import pixels_hash

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # encoded size of one image
MAX_IMAGE_PIXELS = 32 * 1024 * 1024  # width * height of one decoded image
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[A-Za-z0-9=.+-]+)*;base64,", re.ASCII)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """A part that is not a usable image; the message says why (the caller names the part)."""


def data_url_bytes(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,...`)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError("an image data URL must look like 'data:image/<type>;base64,<data>'")
    payload = url[match.end() :]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL is not valid base64") from None


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> an RGB image, refusing corrupt, truncated and oversized ones."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageError(f"the image is {width}x{height}, more than {max_pixels} pixels")
            image.load()
            return image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"not a decodable image ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class PixelValues:
    """One preprocessed image: float32 pixels, its patch grid where the tower takes one, and
    their content hash."""

    # [C, H, W] float32 (CLIP), [1 + tiles, C, S, S] (LLaVA-NeXT), or flat patches
    # [t * h * w, patch dim] (Qwen2.5-VL)
    array: np.ndarray
    hash: str  # sha256 hex of shape + grid + bytes: equal pixels on an equal grid, equal hash
    # Qwen2.5-VL: (t, h, w) patches; LLaVA-NeXT: (1, height, width) of the original image in
    # pixels (transformers' image_sizes); () for a fixed-size tower
    grid_thw: tuple[int, ...] = ()

    @staticmethod
    def of(array: np.ndarray, grid_thw: tuple[int, ...] = ()) -> PixelValues:
        array = np.ascontiguousarray(array, dtype=np.float32)
        return PixelValues(array, pixels_hash(array.shape, grid_thw, array.tobytes()), grid_thw)


@dataclass(frozen=True)
class ClipPreprocessor:
    """transformers' CLIPImageProcessor (PIL backend) for one model's settings; with a fixed
    `size` (height / width) and no crop, SiglipImageProcessor's."""

    shortest_edge: int = 224
    # SiglipImageProcessor (LLaVA with a SigLIP tower): resize to exactly height x width instead
    resize_height: int = 0
    resize_width: int = 0
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL's BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = _OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = _OPENAI_CLIP_STD

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> ClipPreprocessor:
        size = cfg.get("size") or {}
        crop = cfg.get("crop_size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        fixed = (0, 0)
        if "shortest_edge" not in size:
            if "height" not in size or "width" not in size:
                raise ImageError(
                    f"unsupported image processor size {size!r} (shortest_edge or height / width)"
                )
            fixed = (int(size["height"]), int(size["width"]))  # SiglipImageProcessor's
        default = ClipPreprocessor()
        # SiglipImageProcessor has no center crop (and saves no do_center_crop); CLIP's default is on
        crops = cfg.get("image_processor_type") != "SiglipImageProcessor"
        return ClipPreprocessor(
            shortest_edge=int(size.get("shortest_edge", 0)),
            resize_height=fixed[0],
            resize_width=fixed[1],
            crop_height=int(crop.get("height", default.crop_height)),
            crop_width=int(crop.get("width", default.crop_width)),
            resample=int(cfg.get("resample", default.resample)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", crops)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", default.rescale_factor)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", default.image_mean)),
            image_std=tuple(float(v) for v in cfg.get("image_std", default.image_std)),
        )

    @staticmethod
    def from_model_dir(model_dir: str) -> ClipPreprocessor:
        path = Path(model_dir) / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        return ClipPreprocessor.from_config(cfg.get("image_processor", cfg))

    def __call__(self, image: Image.Image) -> PixelValues:
        return PixelValues.of(self.chw(image))

    def chw(self, image: Image.Image) -> np.ndarray:
        """One image's [C, H, W] float32 pixels."""
        image = image.convert("RGB")
        if self.do_resize and self.resize_height:
            size = (self.resize_width, self.resize_height)
            image = image.resize(size, resample=Image.Resampling(self.resample))
        elif self.do_resize:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            size = (new_short, new_long) if width <= height else (new_long, new_short)
            image = image.resize(size, resample=Image.Resampling(self.resample))
        arr = np.asarray(image)  # [H, W, 3] uint8
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_height, self.crop_width)
        out = arr.astype(np.float64) * self.rescale_factor if self.do_rescale else arr
        out = out.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            out = (out - mean) / std
        return np.asarray(out.transpose(2, 0, 1))


_LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class LlavaNextPreprocessor:
    """transformers' LlavaNextImageProcessor (PIL backend): the image resized into its best grid
    pinpoint keeping its aspect ratio (`anyres.select_best_resolution`, PIL on uint8), padded
    with zeros centred to the pinpoint, cut into `tile` x `tile` tiles (row-major); the whole
    image resized (squashed) to `base_height` x `base_width` first; each of the 1 + tiles then
    through CLIP's steps (`clip`: shortest-edge resize, center crop, rescale, normalise).
    -> [1 + tiles, C, S, S] with grid (1, height, width) of the original image."""

    clip: ClipPreprocessor
    pinpoints: tuple[tuple[int, int], ...] = _LLAVA_NEXT_PINPOINTS
    base_height: int = 224
    base_width: int = 224
    tile: int = 224

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> LlavaNextPreprocessor:
        size = cfg.get("size") or {"shortest_edge": 224}
        crop = cfg.get("crop_size") or {"height": 224, "width": 224}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" in size:
            base = (int(size["shortest_edge"]),) * 2
        elif "height" in size and size.get("width") == size["height"]:
            base = (int(size["height"]), int(size["width"]))
        else:  # (a tile is square: resizing it to a square equals a shortest-edge resize)
            raise ImageError(f"unsupported image processor size {size!r} (shortest_edge or a square)")
        clip = ClipPreprocessor.from_config({**cfg, "size": {"shortest_edge": min(base)}, "crop_size": crop})
        tile = int(crop["height"]) if crop.get("height") else base[0]
        pinpoints = cfg.get("image_grid_pinpoints") or _LLAVA_NEXT_PINPOINTS
        return LlavaNextPreprocessor(
            clip, tuple((int(h), int(w)) for h, w in pinpoints), base[0], base[1], tile
        )

    @staticmethod
    def from_model_dir(model_dir: str) -> LlavaNextPreprocessor:
        path = Path(model_dir) / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        return LlavaNextPreprocessor.from_config(cfg.get("image_processor", cfg))

    def __call__(self, image: Image.Image) -> PixelValues:
        image = image.convert("RGB")
        width, height = image.size
        best_h, best_w = anyres.select_best_resolution(height, width, self.pinpoints)
        # transformers' get_patch_output_size: fit inside the pinpoint, aspect ratio kept
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        resample = Image.Resampling(self.clip.resample)
        fitted = np.asarray(image.resize((new_w, new_h), resample=resample))
        top, bottom = divmod(best_h - new_h, 2)
        left, right = divmod(best_w - new_w, 2)
        padded = np.pad(fitted, ((top, top + bottom), (left, left + right), (0, 0)))
        t = self.tile
        tiles = [
            Image.fromarray(padded[i : i + t, j : j + t])
            for i in range(0, best_h, t)
            for j in range(0, best_w, t)
        ]
        base = image.resize((self.base_width, self.base_height), resample=resample)
        out = np.stack([self.clip.chw(tile) for tile in [base, *tiles]])
        return PixelValues.of(out, (1, height, width))


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: the top-left corner at ((H - h) // 2, (W - w) // 2), padding
    with zeros (centred) where the image is smaller than the crop."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        padded = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible (transformers' own)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(
            f"the image's aspect ratio {max(height, width) / min(height, width):.0f} is over 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVLPreprocessor:
    """transformers' Qwen2VLImageProcessor (PIL backend; Qwen2.5-VL uses it too): dynamic
    resolution (`smart_resize` between min_pixels and max_pixels), rescale, normalise, then the
    flat patch layout [grid_h * grid_w, C * temporal_patch * patch * patch], patches ordered by
    merge window. The image then takes grid_h * grid_w / merge_size² placeholder tokens."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = _OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = _OPENAI_CLIP_STD

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> QwenVLPreprocessor:
        size = cfg.get("size") or {}
        default = QwenVLPreprocessor()
        return QwenVLPreprocessor(
            min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
            max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or default.max_pixels),
            patch_size=int(cfg.get("patch_size", default.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", default.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", default.merge_size)),
            resample=int(cfg.get("resample", default.resample)),
            rescale_factor=float(cfg.get("rescale_factor", default.rescale_factor)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", default.image_mean)),
            image_std=tuple(float(v) for v in cfg.get("image_std", default.image_std)),
        )

    @staticmethod
    def from_model_dir(model_dir: str) -> QwenVLPreprocessor:
        path = Path(model_dir) / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        return QwenVLPreprocessor.from_config(cfg.get("image_processor", cfg))

    def num_tokens(self, pixels: PixelValues) -> int:
        """Placeholder tokens of one image: one per merged patch."""
        return math.prod(pixels.grid_thw) // (self.merge_size * self.merge_size)

    def __call__(self, image: Image.Image) -> PixelValues:
        """-> flat patches, with their grid (1, grid_h, grid_w)."""
        image = image.convert("RGB")
        width, height = image.size
        new_h, new_w = smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        image = image.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        scaled = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.array(self.image_mean, dtype=np.float32)
        normed: np.ndarray = (scaled - mean) / np.array(self.image_std, dtype=np.float32)
        chw = normed.transpose(2, 0, 1)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = new_h // p, new_w // p
        patches = chw.reshape(3, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        return PixelValues.of(patches.reshape(grid_h * grid_w, 3 * t * p * p), (1, grid_h, grid_w))
