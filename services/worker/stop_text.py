"""Stop strings matched in the worker, for the protocols whose routers send them to the engine
(SMG's vllm_engine, OpenEngine's stop_text). tandem's own gateway matches stop strings itself,
on the styler's text; here the worker's tokenizer (the one guided decoding loads) gives each
token's bytes, and the match is on bytes, so a stop string split across tokens or inside a
multi-byte character is still found where it completes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TokenBytes(Protocol):
    def decode_bytes(self, tokens: list[int]) -> bytes: ...


class StopText:
    """One choice's output bytes, checked against the stop strings as tokens arrive."""

    def __init__(self, tokenizer: TokenBytes, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [(s, s.encode()) for s in stops if s]
        self.longest = max((len(b) for _, b in self.stops), default=0)
        self.output = b""

    def feed(self, token_ids: Sequence[int]) -> tuple[int, str | None]:
        """(how many of `token_ids` to keep, the stop string that matched or None). The token
        that completes a match is kept (its id is what the engine produced); later ones are not."""
        for i, token in enumerate(token_ids):
            start = max(len(self.output) - self.longest + 1, 0)
            self.output += self.tokenizer.decode_bytes([token])
            window = self.output[start:]
            for text, encoded in self.stops:
                if encoded in window:
                    return i + 1, text
        return len(token_ids), None
