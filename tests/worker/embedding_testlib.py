"""A tiny random embedding model (Qwen3 saved as the base model) and transformers' embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.worker.worker_testlib import TINY, randomize_norms_and_biases


def write_tiny_embedding_model(path: Path) -> Path:
    """A tiny random Qwen3 saved as the base model (AutoModel), as Qwen3-Embedding is: tensors
    without the "model." prefix and no LM head."""
    from transformers import AutoModel, Qwen3Config

    torch.manual_seed(0)
    model = AutoModel.from_config(
        Qwen3Config(**TINY, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)
    )
    randomize_norms_and_biases(model, seed=5)
    model.save_pretrained(str(path))
    return path


def reference(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers: AutoModel's last hidden state (after the final norm) at the last token, normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            hidden = model(torch.tensor([prompt])).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(hidden, dim=-1))
    return out
