"""Incremental, UTF-8-safe detokenization of one token stream.

Decoding token by token breaks multi-byte characters (a CJK character or an emoji is often
several byte-level tokens) and loses context-dependent spaces (SentencePiece drops the leading
space of the first token). So, as vLLM does, each step decodes a short window: the text of
`ids[prefix_offset:]` minus the text of `ids[prefix_offset:read_offset]` is the new text, and it
is only released when it does not end in U+FFFD (an incomplete character). `finish` releases
whatever is left so that the concatenated output equals the decode of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.styler.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens used as left context for the first output tokens.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns token ids of one choice into text deltas."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        keep_token_ids: frozenset[int] = frozenset(),
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Special tokens a parser needs to see (e.g. a tool-call marker) even when skipping.
        self._drop_ids = (
            (tokenizer.special_ids - keep_token_ids) if skip_special_tokens and keep_token_ids else None
        )
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        if self._drop_ids is not None:
            return self._tok.decode([i for i in ids if i not in self._drop_ids], skip_special_tokens=False)
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Text newly complete after appending `token_ids` ("" while a character is incomplete)."""
        self._ids.extend(token_ids)
        if self._ids and self._ids[-1] in self._tok.byte_fallback_ids:
            return ""  # a run of byte tokens decodes as a whole: wait for its end
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._emitted.append(delta)
        return delta

    def finish(self) -> str:
        """The rest of the text: the full decode minus what was already released."""
        context_text = self._decode(self._ids[: self._num_context])
        full = self._decode(self._ids)
        expected = full[len(context_text) :] if full.startswith(context_text) else full
        emitted = "".join(self._emitted)
        rest = expected[len(emitted) :] if expected.startswith(emitted) else ""
        self._emitted.append(rest)
        return rest

    @property
    def num_tokens(self) -> int:
        return len(self._ids) - self._num_context
