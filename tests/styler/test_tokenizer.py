"""Tokenize / Detokenize equal transformers on tricky text, for every shared tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import load_styler, needs_shared, reference_tokenizer, shared_dir, tokenizer_dirs

TEXTS = [
    "Hello, world!",
    " leading space",
    "  two  spaces and trailing ",
    "日本語のテキストと中文，한국어",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flag 🇨🇭",
    "combining: e\u0301 n\u0303 a\u030a\u0323 Zalgo: h\u0335\u0301e\u0336",
    "tabs\tand\nnewlines\r\n\n",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>x<|eot_id|>",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>",
    "<s> inline </s> tokens <unk>",
    "",
]


def _dirs() -> list[Path]:
    stories = shared_dir() / "models" / "stories260K"
    return tokenizer_dirs() + ([stories] if (stories / "tokenizer.json").is_file() else [])


@needs_shared
@pytest.mark.parametrize("tok_dir", _dirs(), ids=lambda p: p.name)
def test_tokenize_detokenize_match_transformers(tok_dir: Path) -> None:
    ref = reference_tokenizer(str(tok_dir))
    styler = load_styler(str(tok_dir))
    for text in TEXTS:
        for add in (True, False):
            ids = ref.encode(text, add_special_tokens=add)
            assert styler.tokenize(text, add_special_tokens=add) == ids, (text, add)
            for skip in (True, False):
                assert styler.detokenize(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                )
    info = styler.info()
    assert info.vocab_size == len(ref)
    assert info.eos_token == (ref.eos_token or "")
    assert info.bos_token == (ref.bos_token or "")
    assert ref.eos_token_id in info.eos_token_ids
    assert set(ref.all_special_tokens) <= set(info.special_tokens)


@needs_shared
@pytest.mark.parametrize("tok_dir", _dirs(), ids=lambda p: p.name)
def test_token_bytes_concatenate_to_the_text(tok_dir: Path) -> None:
    styler = load_styler(str(tok_dir))
    for text in TEXTS[:7]:
        ids = styler.tokenize(text, add_special_tokens=False)
        joined = b"".join(styler.token_bytes(ids)).decode("utf-8", errors="replace")
        decoded = styler.detokenize(ids, skip_special_tokens=False)  # normalized (e.g. NFC) text
        # SentencePiece drops the space it prepended to the first word.
        assert joined in (decoded, " " + decoded), text


@needs_shared
def test_out_of_range_ids_are_refused() -> None:
    styler = load_styler(str(tokenizer_dirs()[0]))
    with pytest.raises(ValueError, match="out of range"):
        styler.detokenize([styler.info().vocab_size + 5])
