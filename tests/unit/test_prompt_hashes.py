"""The prompt hashes the gateway computes for every request (router.prefix_keys, block_hash.
block_hashes, which workers compute too) pack the ids once: the same values as their definitions,
block by block (chain_hash) and chunk by chunk, for prompts of any length and under an adapter."""

from __future__ import annotations

import hashlib
import random

from gateway.router import MAX_PREFIX_CHUNKS, PREFIX_CHUNK, prefix_keys
from services.common.block_hash import ROOT_HASH, block_hashes, chain_hash


def _block_hashes_by_definition(
    ids: list[int], block_size: int, max_blocks: int | None, root: int
) -> list[int]:
    num = len(ids) // block_size if max_blocks is None else min(len(ids) // block_size, max_blocks)
    out, parent = [], root
    for i in range(num):
        parent = chain_hash(parent, ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


def _prefix_keys_by_definition(ids: list[int], lora_name: str) -> list[bytes]:
    h = hashlib.blake2b(digest_size=16, person=b"lora" if lora_name else b"")
    if lora_name:
        h.update(lora_name.encode())
    keys = []
    for i in range(min(len(ids) // PREFIX_CHUNK, MAX_PREFIX_CHUNKS)):
        h.update(b"".join(t.to_bytes(4, "little") for t in ids[i * PREFIX_CHUNK : (i + 1) * PREFIX_CHUNK]))
        keys.append(h.copy().digest())
    return keys


def test_packed_hashes_equal_their_definitions() -> None:
    rng = random.Random(3)
    for n in (0, 1, 15, 16, 17, 64, 1000, PREFIX_CHUNK * (MAX_PREFIX_CHUNKS + 3)):
        ids = [rng.randrange(0, 2**32) for _ in range(n)]
        for lora in ("", "adapter-a"):
            assert prefix_keys(ids, lora) == _prefix_keys_by_definition(ids, lora), (n, lora)
        for block_size, max_blocks, root in ((16, None, ROOT_HASH), (4, 3, 12345), (16, 2, ROOT_HASH)):
            want = _block_hashes_by_definition(ids, block_size, max_blocks, root)
            assert block_hashes(ids, block_size, max_blocks, root) == want, (n, block_size, max_blocks)
    # image positions are negative keys in a worker's block hashes (int64 per position)
    keys = [5, -7, 9, -(2**40)] * 8
    assert block_hashes(keys, 4) == _block_hashes_by_definition(keys, 4, None, ROOT_HASH)
