"""LoRA fixtures: one tiny base per family and three random adapters for each (session scope)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lora_testlib import Adapter, make_adapters, save_base
from worker_testlib import RefModel

torch.set_num_threads(1)
FAMILIES = ["llama", "qwen2", "qwen3"]
# The GPU image has no openai SDK: its run (benchmarks/gpu_run.sh, GPU-marked tests only) leaves out
# the modules that drive the gateway with it, which hold no GPU test.
collect_ignore = [] if importlib.util.find_spec("openai") else ["test_lora_gateway.py", "test_lora_up.py"]


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RefModel, list[Adapter]]]:
    out = {}
    for family in FAMILIES:
        base = save_base(family, tmp_path_factory.mktemp(f"lora-base-{family}"))
        adapters = make_adapters(base, tmp_path_factory, f"lora-{family}")
        out[family] = (base, adapters)
    return out
