"""The content hash of one preprocessed image, shared by the styler (which computes it) and the
worker (which recomputes it: the hash keys the encoder cache and the prefix cache, which every
request shares, so it is never taken on trust)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# The message of a worker's FAILED_PRECONDITION for an image sent as its hash alone that the
# worker does not hold (evicted, or the worker restarted): the gateway matches it and resends
# that request once with the image's pixels.
IMAGE_NOT_CACHED = "this worker does not hold the image of this hash; send its pixels"


def pixels_hash(shape: Sequence[int], grid_thw: Sequence[int], data: bytes) -> str:
    """sha256 hex of the pixels' shape, their patch grid (Qwen2.5-VL; empty for fixed-size
    towers, which keeps LLaVA's hashes as they were) and their float32 bytes."""
    grid = repr(tuple(grid_thw)).encode() if grid_thw else b""
    return hashlib.sha256(repr(tuple(shape)).encode() + grid + data).hexdigest()


def embeddings_hash(shape: Sequence[int], dtype: str, data: bytes) -> str:
    """sha256 hex of an image's embedding rows (an encode worker's output): their shape, dtype
    name and bytes. The worker that takes them keys its prefix cache by this, a hash of what its
    model actually reads, so rows given by a caller can never pass for another image's."""
    return hashlib.sha256(b"embeddings" + repr(tuple(shape)).encode() + dtype.encode() + data).hexdigest()
