"""LLaVA-NeXT's "anyres" geometry, shared by the styler (which tiles the image and expands its
placeholder) and the worker (which packs the tiles' features): pure Python, exactly transformers'
`select_best_resolution`, `get_anyres_image_grid_shape`, `image_size_to_num_patches` and
`unpad_image` / `LlavaNextProcessor._get_number_of_features`.

An image of (height, width) pixels is resized into the grid pinpoint that keeps the most of its
pixels (ties: the least padding), padded to it and cut into `tile` x `tile` tiles, with the whole
image resized to one tile as the base. The language model sees the base tile's rows, then the
tiles' rows laid out as one feature map with the padding rows / columns cut off (`unpadded`) and
an `image_newline` row after each of its rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) with the largest effective resolution (the image downscaled
    into it), then the least wasted area."""
    best = (0, 0)
    max_effective, min_wasted = 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = pw * ph - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (int(ph), int(pw))
    return best


def grid_shape(height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles of the image's pinpoint."""
    ph, pw = select_best_resolution(height, width, pinpoints)
    return ph // tile, pw // tile


def num_tiles(height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Tower inputs of one image: the grid's tiles plus the base image."""
    ph, pw = select_best_resolution(height, width, pinpoints)
    return math.ceil(ph / tile) * math.ceil(pw / tile) + 1


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The feature map of `rows` x `cols` features with the padding of an image of (height,
    width) cut off: (top, bottom, left, right) bounds, as transformers' `unpad_image`."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


def num_image_tokens(
    height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int, side: int, base_tokens: int
) -> int:
    """Placeholder tokens of one image: the base tile's `base_tokens` rows, the unpadded feature
    map of the grid (`side` x `side` features a tile), one newline row per feature-map row."""
    grid_rows, grid_cols = grid_shape(height, width, pinpoints, tile)
    top, bottom, left, right = unpadded(height, width, grid_rows * side, grid_cols * side)
    return base_tokens + (bottom - top) * (right - left + 1)
