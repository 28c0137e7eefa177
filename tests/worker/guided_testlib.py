"""Guided decoding test helpers: the constraints used everywhere, and checks of the decoded text
that do not go through llguidance (Python's `re`, `json` and `jsonschema` are the references)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from services.worker.guided import GuidedSpec, choice_spec

# Bounded on purpose: a random or tiny model then always completes the output in a few dozen tokens.
REGEX = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}\."
CHOICES = ["cat", "dog", "little bird"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}

REGEX_SPEC = GuidedSpec("regex", REGEX)
CHOICE_SPEC = choice_spec(CHOICES)
SCHEMA_SPEC = GuidedSpec("json_schema", json.dumps(SCHEMA))
JSON_OBJECT_SPEC = GuidedSpec("json_object", "")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=False))


def check_regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def check_choice(text: str) -> None:
    assert text in CHOICES, text


def check_schema(text: str) -> None:
    value = json.loads(text)
    # explicit checks (the GPU machine has no jsonschema), then the validator where installed
    assert isinstance(value, dict) and set(value) == {"name", "age", "color", "tags"}, text
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 99
    assert value["color"] in ("red", "green", "blue")
    tags = value["tags"]
    assert isinstance(tags, list) and len(tags) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in tags)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(value, SCHEMA)


def check_json_object(text: str) -> None:
    assert isinstance(json.loads(text), dict), text


CHECKS = {"regex": check_regex, "choice": check_choice, "json_schema": check_schema}
SPECS = {"regex": REGEX_SPEC, "choice": CHOICE_SPEC, "json_schema": SCHEMA_SPEC}


def save_tiny_llama(path: Path, *, uniform: bool, head_dim: int = 16) -> Path:
    """A tiny random Llama with the 512-token vocabulary of stories260K (and no tokenizer in its
    directory: give --tokenizer). `uniform` zeroes the LM head, so every allowed token is equally
    likely whatever the numerics: outputs depend only on the seed and the constraint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=64 // head_dim,
        num_key_value_heads=64 // head_dim,
        num_hidden_layers=2,
        vocab_size=512,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(str(path))
    return path
