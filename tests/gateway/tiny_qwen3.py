"""A tiny random Qwen3 with the real Qwen3 tokenizer and chat template (tools, `<think>`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def write_tiny_qwen3(shared_dir: Path, path: Path) -> Path:
    """Save the model to `path` (a fresh directory) and return it."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / "qwen3" / name, path / name)
    vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=151645,
    )
    Qwen3ForCausalLM(config).save_pretrained(str(path))
    return path
