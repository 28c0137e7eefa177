"""Worker test fixtures (session scope: each tiny model is built and saved once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_testlib import TINY_BUILDERS, RefModel, load_ref

# Tiny models on a shared 2-core machine: one intra-op thread is an order of magnitude faster
# than two threads fighting other processes for the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three tiny families saved as real HF directories (the Llama one sharded with an index)."""
    torch.manual_seed(0)
    dirs = {}
    for name, build in TINY_BUILDERS.items():
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build()
        shard = {"max_shard_size": "100KB"} if name == "llama" else {}
        model.save_pretrained(str(path), **shard)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def ref_models(tiny_model_dirs: dict[str, Path], stories_dir: Path) -> dict[str, RefModel]:
    refs = {name: load_ref(path) for name, path in tiny_model_dirs.items()}
    refs["stories"] = load_ref(stories_dir)
    return refs


@pytest.fixture(scope="session")
def eagle_heads(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> dict[str, Path]:
    """Random EAGLE-1 and EAGLE-3 heads for stories260K, in the published checkpoint layouts (the
    EAGLE-3 one over a draft vocabulary of 200 of the 512 tokens)."""
    from eagle_testlib import EAGLE3_AUX_LAYERS, head_config, random_head_tensors, write_head

    heads = {}
    for name, eagle3 in (("eagle", False), ("eagle3", True)):
        extra = (
            {"draft_vocab_size": 200, "eagle_aux_hidden_state_layer_ids": EAGLE3_AUX_LAYERS} if eagle3 else {}
        )
        cfg = head_config(stories_dir, eagle3, **extra)
        heads[name] = write_head(tmp_path_factory.mktemp(name), cfg, random_head_tensors(cfg, eagle3, seed=3))
    return heads
