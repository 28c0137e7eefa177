"""Shared helpers of the styler tests: the shared data, reference tokenizers, loaded stylers."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from services.styler.styler import Styler, StylerOptions

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    return Path(os.environ.get("TANDEM_SHARED", REPO.parent / "shared"))


def tokenizer_dirs() -> list[Path]:
    root = shared_dir() / "tokenizers"
    return sorted(p for p in root.iterdir() if (p / "tokenizer.json").is_file()) if root.is_dir() else []


def template_files() -> list[Path]:
    root = shared_dir() / "chat-templates"
    return sorted(root.glob("*.jinja")) if root.is_dir() else []


needs_shared = pytest.mark.skipif(
    not tokenizer_dirs(), reason="../shared/tokenizers not found (set TANDEM_SHARED)"
)


@cache
def reference_tokenizer(path: str) -> Any:
    """`transformers`' tokenizer for a directory.

    transformers 5 rebuilds any `LlamaTokenizer(Fast)` as a SentencePiece-style tokenizer from
    the vocabulary, ignoring tokenizer.json's pre-tokenizer; for byte-level models filed under
    that class (DeepSeek-V3) it drops whole scripts. For those we take transformers' generic
    fast tokenizer over tokenizer.json with the config's add_bos/add_eos flags, which is what
    transformers 4 (and vLLM) load."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    if str(config.get("tokenizer_class", "")).startswith("LlamaTokenizer"):
        flags = {k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config}
        return PreTrainedTokenizerFast.from_pretrained(path, **flags)
    return AutoTokenizer.from_pretrained(path)


@cache
def load_styler(path: str, **options: Any) -> Styler:
    return Styler.load(StylerOptions(model=path, **options))
