"""Multimodal rotary positions (M-RoPE, Qwen2.5-VL): each token has a (temporal, height, width)
position, and the rotary frequency pairs are split in three sections (`mrope_section`), each
rotated by one of the three.

Positions as transformers' `Qwen2_5_VLModel.get_rope_index` computes them for still images: a text
token's three positions are equal, and count on from the previous token's largest position plus
one; an image of rows x cols merged patches starting at position s puts its token (r, c) at
(s, s + r, s + c), and the text after it continues at s + max(rows, cols). So a text token at
prompt index p sits at p + shift, where shift sums (max(rows, cols) - rows * cols) over the
images before it, and every generated token at its index + the whole prompt's shift (HF's
`rope_deltas`).

Text tokens therefore rotate exactly as with 1D rope at a shifted position (so decode steps, CUDA
graphs included, take the ordinary cos/sin table); only image tokens need their own rows, which
`mrope_cos_sin` builds for the steps that prefill them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.mm_inputs import ImageInput


@dataclass(frozen=True)
class RopeImage:
    """Where one image's tokens sit, in the prompt and in rotary positions."""

    offset: int  # first token in the prompt
    end: int  # one past its last token
    cols: int  # merged patches per row
    start: int  # rotary position of its first token (all three sections)
    shift_after: int  # a text token at index p after this image (before the next) sits at p + this


def rope_images(images: tuple[ImageInput, ...], merge: int) -> tuple[list[RopeImage], int]:
    """The images' rotary layout and the shift of the tokens after the last one."""
    out: list[RopeImage] = []
    shift = 0
    for image in images:
        _, h, w = image.grid_thw
        rows, cols = h // merge, w // merge
        start = image.offset + shift
        shift = start + max(rows, cols) - image.end
        out.append(RopeImage(image.offset, image.end, cols, start, shift))
    return out, shift


def text_positions(images: tuple[ImageInput, ...], merge: int, start: int, end: int) -> list[int]:
    """The 1D rotary position of tokens [start, end) of a sequence with these images: text tokens
    at their index + the shift of the images before them; an image token at its image's first
    position (a placeholder: its rows come from `image_positions`)."""
    layout, shift = rope_images(images, merge)
    if not layout or start >= layout[-1].end:  # decode, or text after the last image
        return list(range(start + shift, end + shift))
    out: list[int] = []
    before = 0  # the shift after the images that end at or before p
    k = 0
    for p in range(start, end):
        while k < len(layout) and layout[k].end <= p:
            before = layout[k].shift_after
            k += 1
        out.append(layout[k].start if k < len(layout) and layout[k].offset <= p else p + before)
    return out


def image_positions(image: RopeImage, lo: int, hi: int) -> list[list[int]]:
    """The (temporal, height, width) positions of the image's tokens at prompt indices [lo, hi)."""
    js = range(lo - image.offset, hi - image.offset)
    return [
        [image.start] * len(js),
        [image.start + j // image.cols for j in js],
        [image.start + j % image.cols for j in js],
    ]


def section_of_columns(section: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[D] int64: which of the three positions each column of a cos/sin row takes (the table has
    cos in [:, :D/2] and sin in [:, D/2:], frequency pair i at column i of each half)."""
    half = torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
    return torch.cat([half, half]).to(device)


def mrope_cos_sin(
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
    positions: torch.Tensor,  # [3, N] int64: (temporal, height, width) positions
    columns: torch.Tensor,  # [D] int64: section_of_columns
) -> torch.Tensor:  # [N, D]
    """The cos/sin rows of N tokens whose frequency sections rotate by different positions."""
    rows = cos_sin_cache[positions]  # [3, N, D]
    index = columns.view(1, 1, -1).expand(1, positions.shape[1], -1)
    return rows.gather(0, index)[0]
