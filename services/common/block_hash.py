"""The prefix cache's block identity, shared by the worker (block_manager.py) and the gateway
(kv_index.py): a full block of `block_size` tokens is named by a hash chain,

    hash(block i) = chain_hash(hash(block i-1), tokens of block i),   hash(block -1) = ROOT_HASH

so equal hashes mean equal whole prefixes. Blocks computed under a LoRA adapter chain from the
adapter's own root (`lora_root_hash` of its content digest) instead, so the same tokens under two
adapters, or under none, never share KV. It must give the same numbers in every process and on
every Python version (the gateway matches the worker's KV events against it), hence blake2b over
a fixed byte encoding rather than Python's `hash()`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of a block holding `tokens` after the prefix whose last block hashes to `parent`:
    an unsigned 64-bit integer (a uint64 on the wire)."""
    # int64 per position: token ids, and the negative keys that stand for image positions
    # (a multimodal prompt's image rows are keyed by the image's hash, Sequence.key_tokens)
    return _chain(parent, struct.pack(f"<{len(tokens)}q", *tokens))


def _chain(parent: int, packed_tokens: bytes) -> int:
    """chain_hash of a block whose ids are already packed (int64 little-endian each)."""
    payload = struct.pack("<Q", parent) + packed_tokens
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def lora_root_hash(digest: str) -> int:
    """The chain root of blocks computed under the LoRA adapter whose files hash to `digest`
    (ROOT_HASH for the base model, digest "")."""
    if not digest:
        return ROOT_HASH
    payload = struct.pack("<Q", ROOT_HASH) + b"lora:" + digest.encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, max_blocks: int | None = None, root: int = ROOT_HASH
) -> list[int]:
    """Chain hashes of the full blocks of `token_ids`, first block first (at most `max_blocks`);
    `root`: the chain's root (`lora_root_hash` for a prompt under an adapter)."""
    num = len(token_ids) // block_size
    if max_blocks is not None:
        num = min(num, max_blocks)
    hashes: list[int] = []
    parent = root
    # chain_hash's payload, the ids packed once for all the blocks (int64 each)
    packed = struct.pack(f"<{num * block_size}q", *token_ids[: num * block_size])
    step = block_size * 8
    for i in range(num):
        parent = _chain(parent, packed[i * step : (i + 1) * step])
        hashes.append(parent)
    return hashes
