"""LoRA with speculative decoding: the verification forward applies each row's adapter to its
K + 1 positions, the proposer knows nothing of adapters (prompt lookup; a draft model runs the
base model alone), so greedy tokens and logprobs with speculation equal those without, for
requests of three adapters and the base model in one batch, and transformers with each adapter
merged (PEFT merge_and_unload)."""

from __future__ import annotations

import math

import pytest
from lora_testlib import Adapter
from worker_testlib import RefModel, prompts_of_lengths

from services.worker.engine import Engine, GenerateResult, collect
from services.worker.request import EngineRequest, SamplingParams

MAX_TOKENS = 16
NAMES = ["", "alpha", "beta", "gamma"]


def _engine(base: RefModel, adapters: list[Adapter], **overrides: object) -> Engine:
    return base.engine(
        kv_cache_memory="16MiB",
        max_num_batched_tokens=64,
        lora_modules=tuple(f"{a.name}={a.path}" for a in adapters),
        max_lora_rank=16,
        **overrides,
    )


def _run(engine: Engine, prompts: list[list[int]]) -> list[GenerateResult]:
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2)
    reqs = [
        EngineRequest(f"r{i}", tuple(p), sp, lora_name=NAMES[i % len(NAMES)]) for i, p in enumerate(prompts)
    ]
    results = {r.request_id: GenerateResult(r.request_id) for r in reqs}
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
    assert engine.block_manager.num_used_blocks == 0
    return [results[r.request_id] for r in reqs]


@pytest.mark.parametrize("method", ["prompt-lookup", "draft-model"])
def test_speculation_with_adapters_equals_adapters_alone(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]], method: str
) -> None:
    base, adapters = lora_family["llama"]
    refs = {"": base, **{a.name: a.ref for a in adapters}}
    # prompts that repeat themselves: prompt lookup finds spans to copy
    prompts = [p + p[1:] for p in prompts_of_lengths([9, 14, 6, 11, 17, 8, 12, 5], base.vocab_size, seed=4)]
    # the draft model is the base model without the adapters: it agrees on the base model's rows
    # and is corrected on the adapters' (the target verifies with each row's adapter)
    draft = {"speculative_model": str(base.path)} if method == "draft-model" else {}
    spec = _engine(
        base,
        adapters,
        speculative=method,
        num_speculative_tokens=4,
        speculative_adaptive=False,
        **draft,
    )
    got = _run(spec, prompts)
    alone = _run(_engine(base, adapters), prompts)
    for i, (prompt, with_spec, without) in enumerate(zip(prompts, got, alone, strict=True)):
        name = NAMES[i % len(NAMES)]
        assert without.token_ids[0] == refs[name].greedy(prompt, MAX_TOKENS), name
        assert with_spec.token_ids[0] == without.token_ids[0], (method, name, len(prompt))
        for ours, theirs in zip(with_spec.logprobs[0], without.logprobs[0], strict=True):
            assert math.isclose(ours.logprob, theirs.logprob, abs_tol=1e-4)
    stats = spec.speculator.stats if spec.speculator is not None else None
    assert stats is not None and stats.num_accepted_tokens > 0  # drafts were verified and kept
    if method == "draft-model":  # the adapters' rows rejected some of the base model's drafts
        assert stats.num_accepted_tokens < stats.num_draft_tokens
