"""The real chat templates of further model families (Gemma 3, Phi-4, Mixtral; see
tests/data/chat-templates/README.md for where each comes from) render byte-identically to
transformers' apply_chat_template through the styler, text and token ids, for every conversation
of the shared template suite and every shared tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import REPO, needs_shared, tokenizer_dirs
from .test_chat_template import CASES, _ours, _reference

TEMPLATE_DIR = REPO / "tests" / "data" / "chat-templates"
# gpt-oss has its own test (tests/styler/test_gpt_oss_template.py) with its harmony tokenizer.
MODEL_TEMPLATES = [
    "google-gemma-3-it.jinja",
    "microsoft-phi-4.jinja",
    "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja",
]


@needs_shared
@pytest.mark.parametrize("tok_dir", tokenizer_dirs(), ids=lambda p: p.name)
@pytest.mark.parametrize("template_name", MODEL_TEMPLATES)
def test_model_template_matches_transformers(template_name: str, tok_dir: Path) -> None:
    template = (TEMPLATE_DIR / template_name).read_text(encoding="utf-8")
    mismatches: list[str] = []
    num_rendered = 0
    for case in CASES:
        ref, ours = _reference(tok_dir, template, case), _ours(tok_dir, template, case)
        num_rendered += not isinstance(ref, str)
        if ref != ours:
            mismatches.append(f"{case}:\n  ref:  {ref!r}\n  ours: {ours!r}")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:5])
    assert num_rendered > 0  # the suite exercises rendering, not just the template's own errors
