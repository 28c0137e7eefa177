"""Each token's own text and bytes (for logprobs), fetched from the styler once and cached.

The vocabulary is fixed for the life of the gateway, so the cache only grows up to its size.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.downstream import TokenText
from gateway.styler_pool import StylerPool


class TokenTexts:
    def __init__(self, stylers: StylerPool) -> None:
        self._stylers = stylers
        self._cache: dict[int, TokenText] = {}

    async def get(self, token_ids: Sequence[int]) -> list[TokenText]:
        missing = sorted({t for t in token_ids if t not in self._cache})
        if missing:
            texts = await self._stylers.call(lambda c: c.token_texts(missing))
            self._cache.update(zip(missing, texts, strict=True))
        return [self._cache[t] for t in token_ids]
