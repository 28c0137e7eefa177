"""The engine serves LoRA adapters: greedy tokens (and logprobs) per adapter equal transformers
with that adapter merged (PEFT merge_and_unload), with three adapters and the base model in one
batch, in chunked prefill, on prefix-cache hits, and with more adapters than device slots."""

from __future__ import annotations

import math

import pytest
from lora_testlib import Adapter
from worker_testlib import RefModel, prompts_of_lengths, usage_of

from services.worker.engine import Engine, GenerateResult, collect
from services.worker.request import EngineRequest, SamplingParams

LENGTHS = [1, 5, 12, 17, 29, 40, 9, 3]
MAX_TOKENS = 12


def _engine(base: RefModel, adapters: list[Adapter], **overrides: object) -> Engine:
    from services.worker.config import WorkerConfig

    options: dict[str, object] = {
        "model": str(base.path),
        "device": "cpu",
        "kv_cache_memory": "16MiB",
        "max_num_seqs": 64,
        "lora_modules": tuple(f"{a.name}={a.path}" for a in adapters),
        "max_lora_rank": 16,
    }
    options.update(overrides)
    return Engine(WorkerConfig(**options))  # type: ignore[arg-type]


def _run(engine: Engine, requests: list[EngineRequest]) -> dict[str, GenerateResult]:
    results = {r.request_id: GenerateResult(r.request_id) for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
    assert engine.block_manager.num_used_blocks == 0
    return results


def _mixed_requests(
    vocab: int, names: list[str], prefix: str, logprobs: int | None = None, seed: int = 0
) -> list[tuple[EngineRequest, list[int], str]]:
    prompts = prompts_of_lengths(LENGTHS * 2, vocab, seed=seed)
    out = []
    for i, prompt in enumerate(prompts):
        name = names[i % len(names)]
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=logprobs)
        out.append((EngineRequest(f"{prefix}-{i}", tuple(prompt), sp, lora_name=name), prompt, name))
    return out


def _refs(base: RefModel, adapters: list[Adapter]) -> dict[str, RefModel]:
    return {"": base, **{a.name: a.ref for a in adapters}}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("budget", [2048, 16])
def test_adapters_and_base_in_one_batch_match_merged_transformers(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]], family: str, budget: int
) -> None:
    base, adapters = lora_family[family]
    engine = _engine(base, adapters, max_num_batched_tokens=budget)
    refs = _refs(base, adapters)
    names = ["", *[a.name for a in adapters]]
    reqs = _mixed_requests(base.vocab_size, names, "mix", seed=len(family))
    results = _run(engine, [r for r, _, _ in reqs])
    differs = 0
    for req, prompt, name in reqs:
        expected = refs[name].greedy(prompt, MAX_TOKENS)
        assert results[req.request_id].token_ids[0] == expected, (name, len(prompt))
        differs += name != "" and expected != base.greedy(prompt, MAX_TOKENS)
    assert differs >= 6  # the adapters change the output: the test would see them not applied


def test_logprobs_match_merged_transformers(lora_family: dict[str, tuple[RefModel, list[Adapter]]]) -> None:
    base, adapters = lora_family["llama"]
    engine = _engine(base, adapters, max_num_batched_tokens=32)
    refs = _refs(base, adapters)
    reqs = _mixed_requests(base.vocab_size, ["", "alpha", "beta", "gamma"], "lp", logprobs=3, seed=5)[:8]
    results = _run(engine, [r for r, _, _ in reqs])
    for req, prompt, name in reqs:
        tokens, ref_logprobs = refs[name].greedy_with_logprobs(prompt, MAX_TOKENS)
        got = results[req.request_id]
        assert got.token_ids[0] == tokens
        for entry, ref_row in zip(got.logprobs[0], ref_logprobs, strict=True):
            assert math.isclose(entry.logprob, float(ref_row[entry.token_id]), abs_tol=1e-4)
            for token, lp in entry.top:
                assert math.isclose(lp, float(ref_row[token]), abs_tol=1e-4)


def test_prefix_cache_is_keyed_by_adapter(lora_family: dict[str, tuple[RefModel, list[Adapter]]]) -> None:
    base, adapters = lora_family["qwen2"]
    engine = _engine(base, adapters, max_num_batched_tokens=64)
    refs = _refs(base, adapters)
    (prefix,) = prompts_of_lengths([37], base.vocab_size, seed=7)
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    block = engine.config.block_size
    cached = (len(prefix) // block) * block

    def one(rid: str, name: str, tail: int) -> GenerateResult:
        prompt = [*prefix, tail]
        result = _run(engine, [EngineRequest(rid, tuple(prompt), sp, lora_name=name)])[rid]
        assert result.token_ids[0] == refs[name].greedy(prompt, 8), (rid, name)
        return result

    assert usage_of(one("a1", "alpha", 5)).cached_prompt_tokens == 0
    # the same prompt under another adapter, and under the base model: computed afresh
    assert usage_of(one("b1", "beta", 5)).cached_prompt_tokens == 0
    assert usage_of(one("base1", "", 5)).cached_prompt_tokens == 0
    # under the same adapter again: a prefix hit, and still the adapter's tokens
    assert usage_of(one("a2", "alpha", 6)).cached_prompt_tokens == cached > 0
    assert usage_of(one("b2", "beta", 6)).cached_prompt_tokens == cached
    assert usage_of(one("base2", "", 6)).cached_prompt_tokens == cached


def test_more_adapters_than_slots_evict_and_reload(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]],
) -> None:
    base, adapters = lora_family["llama"]
    engine = _engine(base, adapters, max_loras=2, max_num_batched_tokens=64)
    pool = engine.runner.lora
    assert pool is not None and pool.max_loras == 2
    refs = _refs(base, adapters)
    reqs = _mixed_requests(base.vocab_size, ["alpha", "beta", "gamma", ""], "lru", seed=11)
    results = _run(engine, [r for r, _, _ in reqs])
    for req, prompt, name in reqs:
        assert results[req.request_id].token_ids[0] == refs[name].greedy(prompt, MAX_TOKENS), name
    assert pool.num_loads > 3  # three adapters through two slots: some were evicted and loaded again
    # and afterwards one at a time, each evicting the other's slot
    for round_ in range(2):
        for adapter in adapters:
            prompt = prompts_of_lengths([9], base.vocab_size, seed=round_)[0]
            req = EngineRequest(
                f"seq-{round_}-{adapter.name}",
                tuple(prompt),
                SamplingParams(temperature=0.0, max_tokens=6),
                lora_name=adapter.name,
            )
            got = _run(engine, [req])[req.request_id]
            assert got.token_ids[0] == adapter.ref.greedy(prompt, 6)


def test_unknown_adapter_is_refused(lora_family: dict[str, tuple[RefModel, list[Adapter]]]) -> None:
    from services.worker.lora.registry import LoRANotFoundError

    base, adapters = lora_family["llama"]
    engine = _engine(base, adapters[:1])
    with pytest.raises(LoRANotFoundError, match="'nope'"):
        engine.add_request(EngineRequest("x", (1, 5, 6), SamplingParams(max_tokens=2), lora_name="nope"))
    assert not engine.has_unfinished()


def test_async_scheduling_with_more_adapters_than_slots(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]],
) -> None:
    """Steps planned while the previous one runs (async scheduling) keep each row's adapter, and
    fall back to a synchronous step when the continuation would need more adapters than slots."""
    base, adapters = lora_family["qwen3"]
    engine = _engine(base, adapters, max_loras=2, max_num_batched_tokens=32, async_scheduling="on")
    refs = _refs(base, adapters)
    reqs = _mixed_requests(base.vocab_size, ["alpha", "", "beta", "alpha", "gamma"], "async", seed=13)
    results = _run(engine, [r for r, _, _ in reqs])
    for req, prompt, name in reqs:
        assert results[req.request_id].token_ids[0] == refs[name].greedy(prompt, MAX_TOKENS), name
    assert engine.num_continuations > 0
