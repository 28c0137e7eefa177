"""Speculative decoding (docs/speculative.md): greedy output token-identical to decoding without it
(prompt lookup, a draft model that agrees, one that mostly does not) under continuous batching,
chunked prefill, preemption, logprobs, penalties and guided decoding; seeded sampling with
draft-free proposals gives the very same tokens; a draft distribution keeps the target's output
distribution (chi-square); no leaked blocks after aborts mid-speculation; start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from guided_testlib import SCHEMA_SPEC
from scipy.stats import chi2_contingency, chisquare
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion

from services.worker.engine import Engine
from services.worker.kv_cache import block_bytes
from services.worker.model_config import ModelConfigError, load_model_config
from services.worker.request import EngineRequest, SamplingParams
from services.worker.sampling_rng import draw_table, exponential_race
from services.worker.speculative.prompt_lookup import lookup
from services.worker.speculative.rejection import DRAFT_SALT, emitted_tokens, reject_rows, salted
from services.worker.speculative.speculator import choose_k, expected_tokens


@pytest.fixture(scope="module")
def random_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with stories260K's vocabulary: a draft that rarely agrees."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("random-draft")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def noisy_draft_dir(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    """stories260K with noise on its weights: a draft that agrees often, not always."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std() * 0.15)
    path = tmp_path_factory.mktemp("noisy-draft")
    model.save_pretrained(str(path))
    return path


def small_engine(ref: RefModel, num_blocks: int, **overrides: object) -> Engine:
    probe = ref.engine(max_model_len=128)
    per_block = block_bytes(probe.model_config, probe.config.block_size, probe.dtype)
    if overrides.get("speculative") == "eagle":  # the head's cache shares the budget (one layer)
        head = load_model_config(str(overrides["speculative_model"]))
        per_block += block_bytes(head, probe.config.block_size, probe.dtype)
    elif "speculative_model" in overrides:  # the draft's cache shares the budget (Engine._num_kv_blocks)
        per_block *= 2
    return ref.engine(max_model_len=128, kv_cache_memory=str(per_block * num_blocks), **overrides)


def requests(sampled: bool) -> list[EngineRequest]:
    """8 requests, some prompts repeating themselves (prompt lookup finds spans to copy), one
    sharing another's first block (a prefix-cache hit), one with n = 2 choices, one with prompt
    logprobs, penalties, min_tokens."""
    prompts = prompts_of_lengths([20, 9, 33, 14, 26, 5, 17, 30], 512, seed=21)
    prompts = [p + p[1:] if i % 3 == 0 else p for i, p in enumerate(prompts)]
    prompts[7] = prompts[0][:18] + prompts[7][1:]
    out = []
    for i, prompt in enumerate(prompts):
        sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, logprobs=2)
        if i == 1:
            sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, prompt_logprobs=1)
        if i == 3:
            sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, repetition_penalty=1.3)
        if i == 5:
            sp = SamplingParams(temperature=0.0, max_tokens=50, min_tokens=10, frequency_penalty=0.5)
        if i == 6:
            sp = SamplingParams(
                temperature=0.0, max_tokens=50, ignore_eos=True, logit_bias=((300, 4.0), (301, -100.0))
            )
        if sampled and i % 2 == 0:
            sp = SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=50, ignore_eos=True, logprobs=1)
        if sampled and i == 2:
            sp = SamplingParams(temperature=0.8, seed=i, max_tokens=50, ignore_eos=True, n=2)
        out.append(EngineRequest(f"r{i}", tuple(prompt), sp))
    return out


def assert_same(reference: dict, got: dict, rids: list[str] | None = None) -> None:
    for rid in rids or list(reference):
        expected = reference[rid]
        assert got[rid].token_ids == expected.token_ids, rid
        assert got[rid].finish_reasons == expected.finish_reasons, rid
        for index, lps in expected.logprobs.items():
            assert [lp.token_id for lp in got[rid].logprobs[index]] == [lp.token_id for lp in lps]
            assert [lp.logprob for lp in got[rid].logprobs[index]] == pytest.approx(
                [lp.logprob for lp in lps], abs=1e-4
            )


@pytest.mark.parametrize("method", ["prompt-lookup", "draft-same", "draft-random", "eagle", "eagle3"])
def test_greedy_identical_under_batching_chunking_and_preemption(
    ref_models: dict[str, RefModel], random_draft_dir: Path, eagle_heads: dict[str, Path], method: str
) -> None:
    ref = ref_models["stories"]
    spec: dict[str, object] = {"speculative_adaptive": False, "num_speculative_tokens": 4}
    if method == "prompt-lookup":
        spec["speculative"] = "prompt-lookup"
    elif method.startswith("eagle"):  # a random head (EAGLE-1 or EAGLE-3 layout)
        spec |= {"speculative": "eagle", "speculative_model": str(eagle_heads[method])}
    else:
        spec["speculative_model"] = str(ref.path if method == "draft-same" else random_draft_dir)
    # seeded sampled requests ride along; with draft-free proposals they give the same tokens too
    sampled = method == "prompt-lookup"
    reference = run_to_completion(ref.engine(max_model_len=128), requests(sampled))
    engine = small_engine(ref, 16, max_num_batched_tokens=32, **spec)
    got = run_to_completion(engine, requests(sampled))
    assert engine.scheduler.num_preemptions > 0
    stats = engine.speculator.stats if engine.speculator else None
    assert stats is not None and stats.num_drafts > 0
    if method == "draft-same":
        assert stats.acceptance_rate > 0.9
    if method == "draft-random":
        assert stats.acceptance_rate < 0.5
    assert_same(reference, got)
    assert engine.block_manager.num_used_blocks == 0
    if engine.draft_model is not None:
        assert engine.draft_model.num_used_blocks == 0
    if engine.eagle is not None:
        assert engine.eagle.num_used_blocks == 0 and not engine.eagle.states


def test_guided_greedy_identical_with_speculation(ref_models: dict[str, RefModel]) -> None:
    """Drafts are cut to what the grammar allows and each position is masked as it would be."""
    ref = ref_models["stories"]
    prompts = prompts_of_lengths([12, 7, 20], 512, seed=3)
    sp = SamplingParams(temperature=0.0, max_tokens=80, guided=SCHEMA_SPEC, logprobs=1)
    reqs = [EngineRequest(f"g{i}", tuple(p), sp) for i, p in enumerate(prompts)]
    reference = run_to_completion(ref.engine(max_model_len=256), reqs)
    for spec in ({"speculative": "prompt-lookup"}, {"speculative_model": str(ref.path)}):
        engine = ref.engine(max_model_len=256, speculative_adaptive=False, **spec)
        got = run_to_completion(engine, reqs)
        assert engine.speculator is not None and engine.speculator.stats.num_accepted_tokens > 0
        assert_same(reference, got)


def test_abort_mid_speculation_frees_every_block(
    ref_models: dict[str, RefModel], random_draft_dir: Path, eagle_heads: dict[str, Path]
) -> None:
    ref = ref_models["stories"]
    for spec in (
        {"speculative": "prompt-lookup"},
        {"speculative_model": str(random_draft_dir)},
        {"speculative": "eagle", "speculative_model": str(eagle_heads["eagle"])},
        {"speculative": "eagle", "speculative_model": str(eagle_heads["eagle3"])},
    ):
        engine = small_engine(ref, 24, max_num_batched_tokens=48, speculative_adaptive=False, **spec)
        for r in requests(sampled=True):
            engine.add_request(r)
        drafted_steps = 0
        while drafted_steps < 3:
            engine.step()
            assert engine.speculator is not None
            drafted_steps += engine.speculator.stats.num_drafts > 0
        for r in requests(sampled=True):
            engine.abort(r.request_id)
        assert not engine.has_unfinished()
        assert engine.block_manager.num_used_blocks == 0
        assert sorted(engine.block_manager.free) == list(range(engine.block_manager.num_blocks))
        if engine.draft_model is not None:
            assert engine.draft_model.num_used_blocks == 0
        if engine.eagle is not None:  # the head's cache, and the features it kept
            assert engine.eagle.num_used_blocks == 0 and not engine.eagle.states
            assert sorted(engine.eagle.blocks.free) == list(range(engine.eagle.blocks.num_blocks))


def test_draft_model_output_distribution_is_the_targets(
    ref_models: dict[str, RefModel], noisy_draft_dir: Path
) -> None:
    """Rejection sampling end to end: over many seeds, the tokens at output positions 1..3 follow
    the same distribution with a draft model that often disagrees as without speculation (chi-square
    test of homogeneity; the first token is the prefill's, not speculated)."""
    ref = ref_models["stories"]
    prompt = (1, 403, 407, 300)
    seeds = range(300)
    sp = [SamplingParams(temperature=1.0, top_k=4, seed=s, max_tokens=4, ignore_eos=True) for s in seeds]
    plain = ref.engine(max_model_len=64).generate([list(prompt)] * len(sp), sp)
    engine = ref.engine(max_model_len=64, speculative_model=str(noisy_draft_dir), speculative_adaptive=False)
    spec = engine.generate([list(prompt)] * len(sp), sp)
    stats = engine.speculator.stats if engine.speculator else None
    assert stats is not None and stats.num_draft_tokens > 100
    assert 0.05 < stats.acceptance_rate < 0.95  # both the kept and the residual paths ran
    for pos in (1, 2, 3):
        a = [r.token_ids[0][pos] for r in plain]
        b = [r.token_ids[0][pos] for r in spec]
        tokens = sorted(set(a) | set(b))
        table = [[a.count(t) for t in tokens], [b.count(t) for t in tokens]]
        keep = [j for j in range(len(tokens)) if table[0][j] + table[1][j] >= 10]
        rare = [j for j in range(len(tokens)) if j not in keep]
        table = [[row[j] for j in keep] + [sum(row[j] for j in rare)] for row in table]
        assert chi2_contingency(table).pvalue > 1e-3, (pos, table)


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(point_mass: bool) -> None:
    """rejection.py on synthetic distributions (vocabulary 5, K = 3, a target independent of the
    prefix): the token emitted at each position follows p at that position."""
    gen = torch.Generator().manual_seed(0)
    vocab, k, trials = 5, 3, 4000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, dim=-1)
    counts = torch.zeros(k + 1, vocab)
    for seed in range(trials):
        draws = draw_table([(seed, 0, j) for j in range(k + 1)])
        if point_mass:  # a proposal of fixed tokens: q is one-hot
            drafts = torch.tensor([seed % vocab, *p[1:k].argmax(dim=-1).tolist()])
            q_rows = torch.nn.functional.one_hot(drafts, vocab).float()
        else:
            drafts = exponential_race(q, salted(draws[:k], DRAFT_SALT))
            q_rows = q
        keep, replacement = reject_rows(p[:k], q_rows, drafts, draws[:k])
        bonus = int(exponential_race(p[k:], draws[k:])[0])
        tokens = emitted_tokens(drafts.tolist(), keep.tolist(), replacement.tolist(), bonus)
        for j, t in enumerate(tokens):
            counts[j, t] += 1
    for j in range(k + 1):
        n = counts[j].sum()
        assert n >= 100
        result = chisquare(counts[j].numpy(), (p[j] * n).numpy())
        assert result.pvalue > 1e-3, (j, counts[j], p[j] * n)


def test_info_reports_the_counters(ref_models: dict[str, RefModel]) -> None:
    from services.worker.rpc import _speculative_info

    ref = ref_models["stories"]
    engine = ref.engine(max_model_len=128, speculative_model=str(ref.path), num_speculative_tokens=3)
    assert _speculative_info(ref.engine(max_model_len=128)) is None
    engine.generate([[1, 403, 407]], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    info = _speculative_info(engine)
    assert info is not None
    assert (info.method, info.num_speculative_tokens, info.draft_model) == ("draft-model", 3, ref.path.name)
    assert info.num_draft_tokens > 0 and info.num_accepted_tokens == info.num_draft_tokens
    assert info.acceptance_rate == 1.0 and 1.0 < info.mean_accepted_length <= 4.0


def test_prompt_lookup_finds_the_latest_longest_match() -> None:
    tokens = [5, 6, 7, 8, 1, 2, 9, 6, 7, 3, 4, 6, 7]
    assert lookup(tokens, 2, 1, 3) == [3, 4]  # "6 7" last seen before 3 4
    assert lookup([1, 2, 3, 4], 3, 1, 2) == []
    assert lookup([1, 2, 1, 2, 1, 2], 5, 2, 2) == [1, 2]  # what followed, up to the end


def test_adaptive_k_turns_speculation_off_when_it_does_not_pay() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert choose_k(0.0, 1, 8, 1 / 256, 0.1) == 0  # a draft that never agrees
    assert choose_k(0.9, 1, 8, 1 / 256, 0.0) >= 4
    assert choose_k(0.7, 256, 8, 1 / 64, 0.0) == 0  # a large batch: verification costs more


def test_adaptation_turns_a_never_agreeing_draft_off(
    ref_models: dict[str, RefModel], random_draft_dir: Path
) -> None:
    ref = ref_models["stories"]
    engine = ref.engine(max_model_len=256, speculative_model=str(random_draft_dir))
    sp = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    plain = ref.engine(max_model_len=256).generate([[1, 403, 407]], sp)
    got = engine.generate([[1, 403, 407]], sp)
    assert got[0].token_ids == plain[0].token_ids
    spec = engine.speculator
    assert spec is not None and spec.stats.acceptance_rate < 0.2
    assert spec.last_k == 0 and spec.acceptance < 0.2
    # off after a few steps, then one probing step in 16
    assert spec.stats.num_drafts < 30


@pytest.mark.parametrize("method", ["off", "prompt-lookup", "draft-random", "eagle3"])
def test_async_scheduling_runs_the_steps_without_drafts(
    ref_models: dict[str, RefModel], random_draft_dir: Path, eagle_heads: dict[str, Path], method: str
) -> None:
    """With async scheduling on, steps without drafts run ahead as before and a step with drafts
    first reads the step launched ahead: the output is unchanged either way. ("off": a step launched
    ahead with a penalized prompt chunk beside decodes once tripped an assertion.)"""
    ref = ref_models["stories"]
    spec: dict[str, object] = {
        "off": {},
        "prompt-lookup": {"speculative": "prompt-lookup"},
        "draft-random": {"speculative_model": str(random_draft_dir)},
        "eagle3": {"speculative": "eagle", "speculative_model": str(eagle_heads["eagle3"])},
    }[method]
    reference = run_to_completion(ref.engine(max_model_len=128), requests(sampled=True))
    engine = small_engine(ref, 24, max_num_batched_tokens=32, async_scheduling="on", **spec)
    got = run_to_completion(engine, requests(sampled=True))
    assert engine.num_continuations > 0
    assert engine.block_manager.num_hit_tokens > 0
    assert method == "off" or (engine.speculator is not None and engine.speculator.stats.num_drafts > 0)
    if method in ("off", "prompt-lookup"):  # (a draft's sampled tokens differ; its greedy ones do not)
        assert_same(reference, got)
    else:
        assert_same(
            reference, got, [r.request_id for r in requests(sampled=True) if int(r.request_id[1:]) % 2]
        )
    if engine.draft_model is not None:
        assert engine.draft_model.num_used_blocks == 0
    if engine.eagle is not None:
        assert engine.eagle.num_used_blocks == 0


def test_startup_refuses_a_draft_with_another_vocabulary(
    ref_models: dict[str, RefModel], tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ModelConfigError, match="vocabulary has 300 tokens, the target's 512"):
        ref_models["stories"].engine(speculative_model=str(tmp_path))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"speculative": "eagle"}, "needs --speculative-model"),
        ({"speculative": "draft-model"}, "needs --speculative-model"),
        ({"speculative": "prompt-lookup", "num_speculative_tokens": 0}, "num-speculative-tokens"),
        ({"speculative": "prompt-lookup", "prompt_lookup_min": 5}, "prompt-lookup-min"),
        ({"speculative": "prompt-lookup", "task": "embed"}, "task embed"),
    ],
)
def test_unsupported_combinations_are_startup_errors(options: dict[str, object], message: str) -> None:
    from services.worker.config import WorkerConfig

    with pytest.raises(ValueError, match=message):
        WorkerConfig(model="m", **options)  # type: ignore[arg-type]
