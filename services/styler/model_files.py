"""The files of a model (or tokenizer-only) directory the styler reads, parsed once at start.

Reads `tokenizer.json` (required), `tokenizer_config.json`, and when present
`chat_template.jinja` (+ `additional_chat_templates/*.jinja`), `special_tokens_map.json`,
`generation_config.json` and `config.json`, following how Hugging Face `transformers` resolves
them so that templates see the same variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelFilesError(ValueError):
    """The model directory is missing a required file or holds an unreadable one."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} must hold a JSON object")
    return data


def token_text(value: Any) -> str | None:
    """Text of a special token written as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


@dataclass(frozen=True)
class ModelFiles:
    """Parsed contents of a model directory (only what the styler needs)."""

    path: Path
    tokenizer_json: str  # path of tokenizer.json
    tokenizer_config: dict[str, Any]
    special_tokens_map: dict[str, Any]  # special_tokens_map.json ({} when absent)
    generation_config: dict[str, Any]  # generation_config.json ({} when absent)
    model_config: dict[str, Any]  # config.json ({} when absent)
    chat_templates: dict[str, str] = field(default_factory=dict)  # name -> template; "default" first

    @classmethod
    def load(cls, directory: str | Path) -> ModelFiles:
        path = Path(directory)
        if not path.is_dir():
            raise ModelFilesError(f"model directory {str(path)!r} does not exist")
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise ModelFilesError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")

        def optional(name: str) -> dict[str, Any]:
            p = path / name
            return _read_json(p) if p.is_file() else {}

        tokenizer_config = optional("tokenizer_config.json")
        templates: dict[str, str] = {}
        raw = tokenizer_config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for entry in raw:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    templates[str(entry.get("name", "default"))] = entry["template"]
        # transformers >= 4.43 saves templates as files; a file wins over the config entry.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for p in sorted(extra_dir.glob("*.jinja")):
                templates[p.stem] = p.read_text(encoding="utf-8")
        return cls(
            path=path,
            tokenizer_json=str(tokenizer_json),
            tokenizer_config=tokenizer_config,
            special_tokens_map=optional("special_tokens_map.json"),
            generation_config=optional("generation_config.json"),
            model_config=optional("config.json"),
            chat_templates=templates,
        )

    def default_chat_template(self, with_tools: bool = False) -> str | None:
        """The template `apply_chat_template` would pick (the `tool_use` one when tools are given)."""
        if with_tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_templates.get("default")

    def max_model_len(self) -> int:
        """Largest sequence length the files declare (0 when unknown)."""
        candidates: list[int] = []
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            value = self.model_config.get(key)
            if isinstance(value, int) and value > 0:
                candidates.append(value)
        value = self.tokenizer_config.get("model_max_length")
        # transformers writes 1e30 for "no limit"; ignore such values.
        if isinstance(value, (int, float)) and 0 < value < 10**9:
            candidates.append(int(value))
        return min(candidates) if candidates else 0
