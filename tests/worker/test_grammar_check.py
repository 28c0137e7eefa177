"""The grammar check (services/worker/grammar_check.py) refuses what the worker would fail on
later: a constraint whose lexer blows up on its first consumed token is refused up front."""

from __future__ import annotations

import pytest

from services.worker.grammar_check import _first_allowed, check_constraint, llg_tokenizer
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def qwen3_tokenizer():  # type: ignore[no-untyped-def]
    path = SHARED / "tokenizers" / "qwen3" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"no Qwen3 tokenizer at {path}")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent))
    return llg_tokenizer(path.read_text(), len(hf), [hf.eos_token_id])


def test_a_lexer_that_fails_on_its_first_token_is_refused_up_front(qwen3_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """`a{1000000}` compiles and gives a first mask, then fails on the first token consumed
    ("too many expressions constructed"); before the probe the check let it through and the
    worker failed the request mid-decode."""
    error = check_constraint(qwen3_tokenizer, "regex", "a{1000000}")
    assert "too many expressions" in error


@pytest.mark.parametrize("regex", ["[A-Z][a-z]{1,8} [0-9]{2}", "a{3000}", "(yes|no)", "x"])
def test_ordinary_constraints_pass_the_probe(qwen3_tokenizer, regex: str) -> None:  # type: ignore[no-untyped-def]
    assert check_constraint(qwen3_tokenizer, "regex", regex) == ""


def test_first_allowed_skips_end_tokens_and_padding() -> None:
    def mask(*ids: int, words: int = 3) -> bytes:
        value = sum(1 << i for i in ids)
        return value.to_bytes(4 * words, "little")

    assert _first_allowed(mask(5, 40), 96, eos=set()) == 5
    assert _first_allowed(mask(5, 40), 96, eos={5}) == 40
    assert _first_allowed(mask(5), 96, eos={5}) is None
    assert _first_allowed(mask(90), 80, eos=set()) is None  # past the vocabulary: padding bits
    assert _first_allowed(mask(), 96, eos=set()) is None
