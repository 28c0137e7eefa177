"""Disaggregation test fixtures: the tiny random Qwen3 (saved once per session)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_servers import LoopThread

# Tiny models on a shared 2-core machine: one intra-op thread per engine is fastest.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    """An event loop in a thread for the module's in-process workers."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        vocab_size=320,
        max_position_embeddings=256,
        initializer_range=0.1,  # peaked enough that greedy choices are not near-ties
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(str(path))
    return path
