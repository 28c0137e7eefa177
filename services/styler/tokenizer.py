"""The tokenizer: `tokenizers` plus the bits of `transformers` that change its results.

`transformers` (not imported here) wraps a fast tokenizer and, on load, may replace its
post-processor (from `add_bos_token` / `add_eos_token`), add named special tokens missing from
the vocabulary, and on decode clean up spaces for non-BPE models. We redo exactly those steps so
ids and text match `AutoTokenizer` while the serving path stays free of `transformers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from services.styler.model_files import ModelFiles, token_text

# The named special tokens `transformers` exposes as attributes and passes to chat templates.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in of each byte -> the byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, verbatim.
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _normalizer_shrink(spec: dict[str, Any] | None) -> int:
    """How many times fewer bytes a normalizer can make of a text (0: no bound). Unicode
    normalization composes at most three code points into one (Hangul jamo: 9 bytes to 3);
    lowercasing shortens a few characters (the ohm sign: 3 bytes to 2)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for member in spec.get("normalizers", []):
            factor *= _normalizer_shrink(member)
        return factor
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return 3
    if kind == "Lowercase":
        return 2
    if kind == "Prepend":
        return 1
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        content = spec.get("content", "")
        if pattern is not None and len(content.encode()) >= len(pattern.encode()):
            return 1
    return 0  # Strip, BertNormalizer, regex replacements, ...: text may vanish


def _drops_text(spec: Any) -> bool:
    """Whether a pre-tokenizer may delete input text (whitespace splitters, removed splits)."""
    if isinstance(spec, dict):
        if spec.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"):
            return True
        if spec.get("behavior") == "Removed":
            return True
        return any(_drops_text(v) for v in spec.values())
    if isinstance(spec, list):
        return any(_drops_text(v) for v in spec)
    return False


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass(frozen=True)
class TokenizerInfo:
    """Static facts about a loaded tokenizer."""

    vocab_size: int  # including added tokens
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]  # tokenizer, config.json and generation_config.json, in that order
    special_tokens: tuple[str, ...]  # named + extra + every added token flagged special
    max_model_len: int  # 0 when unknown
    max_token_bytes: int  # most input-text bytes one token stands for (0 = no such bound)


class Tokenizer:
    """A fast tokenizer loaded from a model directory, behaving like `AutoTokenizer`."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        config = files.tokenizer_config
        self._tok = HFTokenizer.from_file(files.tokenizer_json)
        self.special_tokens_map = self._resolve_special_tokens(files)
        self.extra_special_tokens = self._resolve_extra_special_tokens(files)
        self._add_missing_special_tokens()
        self._update_post_processor(config)
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
        )
        self._byte_level = "ByteLevel" in repr(self._tok.decoder)
        self._max_token_bytes_cache: int | None = None
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # ByteFallback turns a whole run of <0xXX> tokens into U+FFFDs when the run is not valid
        # UTF-8, so the text of a byte token is only known once its run has ended.
        self.byte_fallback_ids: frozenset[int] = frozenset()
        if "ByteFallback" in repr(self._tok.decoder):
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self.byte_fallback_ids = frozenset(i for piece, i in vocab.items() if _BYTE_TOKEN.match(piece))

    @classmethod
    def from_dir(cls, directory: str) -> Tokenizer:
        return cls(ModelFiles.load(directory))

    @staticmethod
    def _resolve_special_tokens(files: ModelFiles) -> dict[str, str]:
        """The `special_tokens_map` of transformers: named tokens plus model-specific `*_token` keys."""
        config = files.tokenizer_config
        result: dict[str, str] = {}
        for key, value in config.items():
            text = token_text(value)
            if text is not None and key.endswith("_token"):
                result[key] = text
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            for key, value in extra.items():
                text = token_text(value)
                if text is not None:
                    result[key] = text
        for key, value in files.special_tokens_map.items():
            text = token_text(value)
            if text is not None and key.endswith("_token") and not result.get(key):
                result[key] = text
        return result

    @staticmethod
    def _resolve_extra_special_tokens(files: ModelFiles) -> list[str]:
        extra: list[str] = []
        for source in (files.tokenizer_config, files.special_tokens_map):
            for key in ("extra_special_tokens", "additional_special_tokens"):
                values = source.get(key)
                if isinstance(values, list):
                    for value in values:
                        text = token_text(value)
                        if text is not None and text not in extra:
                            extra.append(text)
        return extra

    def _add_missing_special_tokens(self) -> None:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [
            t for t in [*self.special_tokens_map.values(), *self.extra_special_tokens] if t not in vocab
        ]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])

    def _update_post_processor(self, config: dict[str, Any]) -> None:
        explicit = "add_bos_token" in config or "add_eos_token" in config
        if not explicit and self._tok.post_processor is not None:
            return
        bos = self.special_tokens_map.get("bos_token") or ""
        eos = self.special_tokens_map.get("eos_token") or ""
        add_bos = bool(config.get("add_bos_token", False)) and bool(bos)
        add_eos = bool(config.get("add_eos_token", False)) and bool(eos)
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special: list[tuple[str, int]] = []
        if add_bos:
            special.append((bos, self._require_id(bos)))
        if add_eos:
            special.append((eos, self._require_id(eos)))
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def _require_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return int(token_id)

    # -- public API -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tok.token_to_id(token)
        return None if token_id is None else int(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def added_token_id(self, text: str) -> int | None:
        """The id of the added token whose text is exactly `text` (None when there is none)."""
        token_id = self._tok.token_to_id(text)
        if token_id is None or token_id not in self._tok.get_added_tokens_decoder():
            return None
        return int(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it): a long prompt
        # tokenized in the thread pool then does not stall the event loop serving the others.
        (encoding,) = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else str(text)

    def check_ids(self, token_ids: Sequence[int], field: str = "token_ids") -> None:
        """Raise ValueError naming `field` and the first id outside the vocabulary."""
        size = self.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < size:
                raise ValueError(f"{field}: token id {token_id} is out of range (vocabulary size {size})")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (possibly part of a UTF-8 character)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        added = self._tok.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return piece.encode("utf-8")
        return self._piece_bytes(piece)

    def _piece_bytes(self, piece: str) -> bytes:
        """The bytes a vocabulary piece (not an added token) stands for."""
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode("utf-8")
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def info(self) -> TokenizerInfo:
        eos_ids: list[int] = []
        eos = self.special_tokens_map.get("eos_token")
        if eos is not None and (eos_id := self.token_to_id(eos)) is not None:
            eos_ids.append(eos_id)
        for source in (self.files.model_config, self.files.generation_config):
            for token_id in _as_id_list(source.get("eos_token_id")):
                if token_id not in eos_ids:
                    eos_ids.append(token_id)
        special = [*self.special_tokens_map.values(), *self.extra_special_tokens]
        for _, added in sorted(self._tok.get_added_tokens_decoder().items()):
            if added.special:
                special.append(added.content)
        return TokenizerInfo(
            vocab_size=self.vocab_size,
            bos_token=self.special_tokens_map.get("bos_token"),
            eos_token=eos,
            eos_token_ids=tuple(eos_ids),
            special_tokens=tuple(dict.fromkeys(special)),
            max_model_len=self.files.max_model_len(),
            max_token_bytes=self._max_token_bytes(),
        )

    def _max_token_bytes(self) -> int:
        """The most bytes of input text one token can stand for: the longest token's bytes times
        how much the normalizer may shrink text; 0 where text may vanish (whitespace-dropping
        pre-tokenizers, fused unknown runs, other models than BPE)."""
        if self._max_token_bytes_cache is None:
            spec = json.loads(self._tok.to_str())
            model = spec.get("model") or {}
            factor = _normalizer_shrink(spec.get("normalizer"))
            if (
                model.get("type") != "BPE"
                or (model.get("fuse_unk") and not model.get("byte_fallback"))
                or _drops_text(spec.get("pre_tokenizer"))
            ):
                factor = 0
            added = self._tok.get_added_tokens_decoder()
            longest = max((len(t.content.encode()) for t in added.values()), default=1)
            for piece in self._tok.get_vocab(with_added_tokens=False):
                if len(piece) * 4 > longest:  # a piece is at most 4 bytes a character
                    longest = max(longest, len(self._piece_bytes(piece)))
            self._max_token_bytes_cache = max(longest, 1) * factor
        return self._max_token_bytes_cache
