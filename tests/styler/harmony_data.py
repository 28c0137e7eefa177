"""gpt-oss test data: its real chat template, and a model directory whose tokenizer has the harmony
special tokens.

gpt-oss's own tokenizer (`o200k_harmony`, tokenizer.json in openai/gpt-oss-20b) is a 27 MB file
that is not available offline here; the stand-in is a byte-level BPE tokenizer without merges
(every byte a token) plus the same special tokens, in transformers' `PreTrainedTokenizerFast`
format: what matters for rendering, the harmony markers and their parsers is the template and
the special tokens, which are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPT_OSS_TEMPLATE = REPO / "tests" / "data" / "chat-templates" / "openai-gpt-oss-20b.jinja"
# openai/gpt-oss-20b's special tokens (tokenizer_config.json), in their order there
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
    "<|endofprompt|>",
)


def write_harmony_tokenizer(model_dir: Path) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json (the real chat template) in `model_dir`; returns the
    special tokens' ids (after the 256 byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(HARMONY_SPECIAL_TOKENS))
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in HARMONY_SPECIAL_TOKENS}
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in ids.items()
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": GPT_OSS_TEMPLATE.read_text(encoding="utf-8"),
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return ids


def harmony_model_dir(root: Path) -> Path:
    """A styler-loadable directory: the stand-in tokenizer and the real template."""
    model_dir = root / "gpt-oss-tokenizer"
    write_harmony_tokenizer(model_dir)
    return model_dir
