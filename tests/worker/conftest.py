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
