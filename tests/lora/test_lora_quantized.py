"""LoRA adapters on a quantized model whose norms are folded into its quantized GEMMs (docs/
quantization.md, "Fused decode GEMMs"): the norm weights stay in the norms (no projection weight
carries them), so an adapter of qkv reads h * g in the decode step and the norm runs for the
projections an adapter reads; greedy tokens equal the same engine with its norms unfolded."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_testlib import make_adapter, save_base
from worker_testlib import prompts_of_lengths, run_to_completion

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.models.llama import LlamaForCausalLM
from services.worker.request import EngineRequest, SamplingParams


def _engine(base: Path, adapters: list[str]) -> Engine:
    return Engine(
        WorkerConfig(
            model=str(base),
            device="cpu",
            kv_cache_memory="16MiB",
            max_num_seqs=6,  # decode steps of <= 8 tokens: the folded forward (FOLDED_MAX_TOKENS)
            lora_modules=tuple(adapters),
            max_lora_rank=16,
            quantization="int8",
        )
    )


def test_adapters_on_a_quantized_model_with_norms_in_its_gemms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = save_base("llama", tmp_path / "base", norms_seed=4)  # (norm weights that are not ones)
    adapters = [
        make_adapter(base, tmp_path / "a", "alpha", seed=1, rank=8),
        make_adapter(base, tmp_path / "c", "gamma", seed=3, rank=16, target_modules=["gate_proj", "k_proj"]),
    ]
    modules = [f"{a.name}={a.path}" for a in adapters]
    folded = _engine(tmp_path / "base", modules)
    assert folded.runner.model.norms_folded
    monkeypatch.setattr(LlamaForCausalLM, "can_fold_norms", lambda self: False)
    unfolded = _engine(tmp_path / "base", modules)
    assert not unfolded.runner.model.norms_folded

    names = ["", "alpha", "gamma"]
    prompts = prompts_of_lengths([1, 5, 12, 17, 9, 3], base.vocab_size, seed=7)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    def tokens(engine: Engine) -> list[list[int]]:
        requests = [
            EngineRequest(f"r{i}-{n}", tuple(p), greedy, lora_name=n)
            for i, p in enumerate(prompts)
            for n in names
        ]
        results = run_to_completion(engine, requests)
        return [results[r.request_id].token_ids[0] for r in requests]

    got = tokens(folded)
    assert got == tokens(unfolded)
    # the adapters change the output (the test would see them not applied)
    assert sum(got[i] != got[i - i % 3] for i in range(len(got))) >= 4
