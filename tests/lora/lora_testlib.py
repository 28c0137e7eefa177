"""LoRA test helpers: tiny random base models saved by transformers, random PEFT adapters for them
(init_lora_weights=False, so B is not zero), and the reference: transformers with the adapter
merged by PEFT's `merge_and_unload`."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from worker_testlib import TINY_BUILDERS, RefModel, load_ref, randomize_norms_and_biases

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The three adapters most LoRA tests serve, by name: make_adapter's arguments after the name.
THREE_ADAPTERS: dict[str, dict[str, Any]] = {
    # every projection
    "alpha": {"seed": 1, "rank": 8},
    # a smaller rank, attention only, rsLoRA scaling
    "beta": {
        "seed": 2,
        "rank": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "use_rslora": True,
    },
    # the MLP and k_proj, the largest rank allowed
    "gamma": {
        "seed": 3,
        "rank": 16,
        "alpha": 8,
        "target_modules": ["gate_proj", "up_proj", "down_proj", "k_proj"],
    },
}


@dataclass
class Adapter:
    name: str
    path: Path
    ref: RefModel  # transformers with this adapter merged


def save_base(model: str | Callable[[], Any], path: Path, norms_seed: int | None = None) -> RefModel:
    """A tiny random base model (torch seed 0) saved in `path`, and transformers on it: `model` is a
    TINY_BUILDERS family or a builder; with `norms_seed`, random norm weights and biases
    (randomize_norms_and_biases: norm weights of ones would hide an adapter A left unfolded)."""
    torch.manual_seed(0)
    hf = TINY_BUILDERS[model]() if isinstance(model, str) else model()
    if norms_seed is not None:
        randomize_norms_and_biases(hf, seed=norms_seed)
    hf.save_pretrained(str(path))
    return load_ref(path)


def make_adapter(
    base: RefModel,
    path: Path,
    name: str,
    seed: int,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    scale: float = 0.3,
) -> Adapter:
    """A random PEFT adapter saved in `path`, and the base model with it merged (the reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules or ALL_MODULES,
        init_lora_weights=False,
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    model: Any = get_peft_model(copy.deepcopy(base.hf), config)
    with torch.no_grad():  # small enough that the adapted model still makes clear greedy choices
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.mul_(scale)
    model.save_pretrained(str(path))
    merged = model.merge_and_unload().eval()
    return Adapter(name, path, RefModel(base.path, merged, base.eos_token_ids, base.vocab_size))


def make_adapters(
    base: RefModel,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    adapters: dict[str, dict[str, Any]] = THREE_ADAPTERS,
) -> list[Adapter]:
    """make_adapter for each name of `adapters` (its other arguments), each in a fresh directory."""
    return [
        make_adapter(base, tmp_path_factory.mktemp(f"{prefix}-{name}"), name, **options)
        for name, options in adapters.items()
    ]


def expected_text(client: Any, ref: RefModel, prompt: list[int], max_tokens: int) -> str:
    """The reference's greedy continuation of `prompt` as text in context, detokenized by the
    stack's own /detokenize (`client`: an openai.OpenAI; the prompt's text cut off the front)."""

    def text(tokens: list[int]) -> str:
        reply = client.post("/../detokenize", body={"tokens": tokens}, cast_to=object)
        return str(reply["prompt"])

    prompt_text, full = text(prompt), text(prompt + ref.greedy(prompt, max_tokens))
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]
