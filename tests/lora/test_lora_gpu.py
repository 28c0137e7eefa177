"""LoRA on CUDA in bf16 (Triton shrink/expand kernels, CUDA graphs): graphs on and off give the
same tokens for a batch mixing adapters and the base model, with more adapters than slots (LRU
refills under captured graphs), and the adapters' logprobs stay close to transformers with the
adapter merged (fp32)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lora_testlib import Adapter, make_adapter
from worker_testlib import RefModel, load_ref, prompts_of_lengths

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefModel, list[Adapter]]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        vocab_size=2048,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("gpu-lora-base")
    tf.LlamaForCausalLM(cfg).save_pretrained(str(path))
    base = load_ref(path)
    adapters = [
        make_adapter(base, tmp_path_factory.mktemp(f"gpu-lora-{i}"), f"a{i}", seed=i, rank=16, scale=0.5)
        for i in range(3)
    ]
    return base, adapters


def _engine(base: RefModel, adapters: list[Adapter], enforce_eager: bool) -> Any:
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine

    return Engine(
        WorkerConfig(
            model=str(base.path),
            device="cuda",
            dtype="bfloat16",
            kv_cache_memory="256MiB",
            max_num_seqs=16,
            enforce_eager=enforce_eager,
            lora_modules=tuple(f"{a.name}={a.path}" for a in adapters),
            max_loras=2,
            max_lora_rank=16,
        )
    )


def _generate(
    engine: Any, prompts: list[list[int]], names: list[str], logprobs: int | None = None
) -> list[Any]:
    from services.worker.engine import GenerateResult, collect
    from services.worker.request import EngineRequest, SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=logprobs)
    results = {}
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), sp, lora_name=name))
        results[f"r{i}"] = GenerateResult(f"r{i}")
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
    return list(results.values())


def test_graphs_on_and_off_identical_and_close_to_merged(setup: tuple[RefModel, list[Adapter]]) -> None:
    base, adapters = setup
    prompts = prompts_of_lengths([5, 17, 33, 9, 12, 40, 3, 21], base.vocab_size, seed=1)
    names = ["", "a0", "a1", "a2"] * 2  # three adapters through two slots
    eager = _engine(base, adapters, enforce_eager=True)
    out_eager = [r.token_ids[0] for r in _generate(eager, prompts, names)]
    del eager
    graphs = _engine(base, adapters, enforce_eager=False)
    assert graphs.runner.graphs is not None
    out_graphs = [r.token_ids[0] for r in _generate(graphs, prompts, names, logprobs=1)]
    assert out_graphs == out_eager
    # each adapter's first-token logprob against the merged fp32 model: bf16 distance only
    refs = {"": base, **{a.name: a.ref for a in adapters}}
    got = _generate(graphs, prompts, names, logprobs=1)
    for prompt, name, result in zip(prompts, names, got, strict=True):
        _, ref_logprobs = refs[name].greedy_with_logprobs(prompt, 1)
        entry = result.logprobs[0][0]
        assert math.isclose(entry.logprob, float(ref_logprobs[0][entry.token_id]), abs_tol=0.1), name


def test_base_steps_replay_the_graphs_without_lora_kernels(setup: tuple[RefModel, list[Adapter]]) -> None:
    """A step of base rows only replays the decode graph captured without the LoRA kernels; a step
    with an adapter row the one captured with them (layers/lora.py, model_runner.py)."""
    base, adapters = setup
    engine = _engine(base, adapters, enforce_eager=False)
    graphs = engine.runner.graphs
    assert graphs is not None and set(graphs.replays_by_variant) == {"base", "lora"}
    prompts = prompts_of_lengths([7, 19, 4], base.vocab_size, seed=2)
    _generate(engine, prompts, ["", "", ""])
    assert graphs.replays_by_variant["lora"] == 0 and graphs.replays_by_variant["base"] > 0
    base_replays = graphs.replays_by_variant["base"]
    _generate(engine, prompts, ["", "a0", "a1"])
    assert graphs.replays_by_variant["lora"] > 0 and graphs.replays_by_variant["base"] == base_replays
