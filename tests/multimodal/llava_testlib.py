"""Constants and helpers of the tiny LLaVA tests (conftest.py builds the model directory)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

IMAGE_TOKEN = 512  # "<image>", added after stories260K's 512 tokens
VOCAB = 513
IMAGE_SIZE = 42  # 3 x 3 patches of 14: 9 image tokens per image ("default": the CLS row dropped)
TOKENS_PER_IMAGE = 9


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
