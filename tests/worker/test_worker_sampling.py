"""Sampler behaviour: logprobs against transformers, seeded reproducibility, n > 1, resume, penalties."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion, usage_of

from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams


@pytest.fixture(scope="module")
def stories(ref_models: dict[str, RefModel]) -> RefModel:
    return ref_models["stories"]


@pytest.fixture(scope="module")
def stories_engine(stories: RefModel) -> Engine:
    return stories.engine(max_num_batched_tokens=64)


@pytest.mark.parametrize("model", ["stories", "qwen3"])
def test_logprobs_match_transformers(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    engine = ref.engine()
    prompts = prompts_of_lengths([4, 11, 19], ref.vocab_size, seed=3)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, logprobs=5))
    for prompt, result in zip(prompts, results, strict=True):
        tokens, ref_logprobs = ref.greedy_with_logprobs(prompt, 10)
        assert result.token_ids[0] == tokens
        for token, lp, ref_lp in zip(tokens, result.logprobs[0], ref_logprobs, strict=True):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(ref_lp[token].item(), abs=1e-4)
            assert lp.rank == int((ref_lp > ref_lp[token]).sum()) + 1 == 1
            top_vals, top_ids = ref_lp.topk(5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_logprobs_of_sampled_token_and_rank(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407]
    sp = SamplingParams(temperature=1.5, seed=5, max_tokens=12, logprobs=0)
    (result,) = stories_engine.generate([prompt], sp)
    tokens = result.token_ids[0]
    with torch.no_grad():
        logits = stories.hf(torch.tensor([prompt + tokens])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(result.logprobs[0]):
        row = ref[len(prompt) - 1 + i]
        assert lp.top == ()
        assert lp.logprob == pytest.approx(row[tokens[i]].item(), abs=1e-4)
        assert lp.rank == int((row > row[tokens[i]]).sum()) + 1


def test_seeded_request_is_batch_independent(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407, 261]
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40, ignore_eos=True)
    alone = run_to_completion(stories_engine, [EngineRequest("alone", tuple(prompt), sp)])["alone"]
    others = [
        EngineRequest(
            f"other-{i}", tuple(p), SamplingParams(temperature=0.8, seed=i if i % 2 else None, max_tokens=30)
        )
        for i, p in enumerate(prompts_of_lengths([3 + 5 * i for i in range(16)], stories.vocab_size, seed=11))
    ]
    batched = run_to_completion(
        stories_engine, [*others[:8], EngineRequest("in-batch", tuple(prompt), sp), *others[8:]]
    )
    assert batched["in-batch"].token_ids[0] == alone.token_ids[0]
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=40, ignore_eos=True)
    different = run_to_completion(stories_engine, [EngineRequest("other-seed", tuple(prompt), other_seed)])[
        "other-seed"
    ]
    assert different.token_ids[0] != alone.token_ids[0]


def test_resume_with_generated_tokens_continues_exactly(stories_engine: Engine) -> None:
    prompt = (1, 403, 407, 261, 378)
    sp = SamplingParams(temperature=1.0, seed=77, max_tokens=30, ignore_eos=True, presence_penalty=0.5)
    full = run_to_completion(stories_engine, [EngineRequest("full", prompt, sp)])["full"].token_ids[0]
    resumed = run_to_completion(
        stories_engine, [EngineRequest("resumed", prompt, sp, generated_token_ids=tuple(full[:9]))]
    )
    assert resumed["resumed"].token_ids[0] == full[9:]
    assert usage_of(resumed["resumed"]).completion_tokens == len(full) - 9


def test_n_choices_share_the_prompt_and_match_split_requests(stories_engine: Engine) -> None:
    prompt = tuple(prompts_of_lengths([21], 512, seed=4)[0])  # 21 % 16 != 0: the partial block is copied
    sp = SamplingParams(temperature=1.0, seed=99, max_tokens=25, ignore_eos=True, n=4)
    together = run_to_completion(stories_engine, [EngineRequest("n4", prompt, sp, first_choice_index=0)])[
        "n4"
    ]
    assert sorted(together.token_ids) == [0, 1, 2, 3]
    assert usage_of(together).completion_tokens == 4 * 25
    single = SamplingParams(temperature=1.0, seed=99, max_tokens=25, ignore_eos=True)
    for index in range(4):
        alone = run_to_completion(
            stories_engine, [EngineRequest(f"c{index}", prompt, single, first_choice_index=index)]
        )
        assert alone[f"c{index}"].token_ids[index] == together.token_ids[index]
    assert len({tuple(t) for t in together.token_ids.values()}) == 4


def test_n_greedy_choices_equal_reference(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407, 261, 378, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]  # 16: no copy
    out = run_to_completion(
        stories_engine,
        [EngineRequest("g3", tuple(prompt), SamplingParams(temperature=0.0, max_tokens=20, n=3))],
    )
    expected = stories.greedy(prompt, 20)
    assert all(out["g3"].token_ids[i] == expected for i in range(3))


def test_repetition_penalty_matches_transformers(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407, 261, 378]
    (result,) = stories_engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.8)
    )
    out = stories.hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=30,
        do_sample=False,
        repetition_penalty=1.8,
        eos_token_id=stories.eos_token_ids,
        pad_token_id=0,
    )
    assert result.token_ids[0] == out[0, len(prompt) :].tolist()


def test_presence_and_frequency_penalties_follow_openai_formula(
    stories: RefModel, stories_engine: Engine
) -> None:
    prompt = [1, 403, 407, 261]
    sp = SamplingParams(
        temperature=0.0, max_tokens=25, presence_penalty=1.5, frequency_penalty=0.7, ignore_eos=True
    )
    (result,) = stories_engine.generate([prompt], sp)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            logits = stories.hf(torch.tensor([tokens])).logits[0, -1].float()
            counts = torch.bincount(
                torch.tensor(tokens[len(prompt) :], dtype=torch.long), minlength=logits.shape[0]
            )
            logits = logits - 0.7 * counts - 1.5 * (counts > 0).float()
            tokens.append(int(logits.argmax()))
    assert result.token_ids[0] == tokens[len(prompt) :]


def test_filters_collapse_to_greedy(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407]
    expected = stories.greedy(prompt, 15)
    for sp in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=15),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=15),
        SamplingParams(temperature=1.0, min_p=1.0, max_tokens=15),
    ):
        (result,) = stories_engine.generate([prompt], sp)
        assert result.token_ids[0] == expected, sp


def test_min_tokens_stop_ids_and_ignore_eos(stories: RefModel, stories_engine: Engine) -> None:
    prompt = [1, 403, 407, 261, 378]
    greedy = stories.greedy(prompt, 400)
    assert greedy[-1] in (1, 2) and len(greedy) < 400
    (longer,) = stories_engine.generate(
        [prompt], SamplingParams(temperature=0.0, min_tokens=len(greedy) + 5, max_tokens=400)
    )
    assert len(longer.token_ids[0]) >= len(greedy) + 5
    assert not set(longer.token_ids[0][: len(greedy) + 4]) & {1, 2}
    (ignored,) = stories_engine.generate(
        [prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=len(greedy) + 3)
    )
    assert len(ignored.token_ids[0]) == len(greedy) + 3 and ignored.finish_reasons[0] == "length"
    stop_id = greedy[4]
    (stopped,) = stories_engine.generate(
        [prompt], SamplingParams(temperature=0.0, stop_token_ids=(stop_id,), max_tokens=50)
    )
    first = greedy.index(stop_id)
    assert stopped.token_ids[0] == greedy[: first + 1]
    assert stopped.finish_reasons[0] == "stop" and stopped.stop_token_ids[0] == stop_id


def test_prompt_logprobs_match_transformers_across_chunks_and_cache(stories: RefModel) -> None:
    engine = stories.engine(max_num_batched_tokens=16)  # a 40-token prompt spans three steps
    prompt = prompts_of_lengths([40], stories.vocab_size, seed=12)[0]
    warm = run_to_completion(
        engine, [EngineRequest("warm", tuple(prompt), SamplingParams(temperature=0.0, max_tokens=2))]
    )
    assert usage_of(warm["warm"]).completion_tokens == 2
    sp = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3)
    engine.add_request(EngineRequest("plp", tuple(prompt), sp))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert all(out.choices or out.finished for out in outputs)  # prefill chunks emit nothing
    first, *rest = outputs
    assert first.prompt_logprobs is not None and all(o.prompt_logprobs is None for o in rest)
    assert (
        outputs[-1].usage is not None and outputs[-1].usage.cached_prompt_tokens == 0
    )  # computed, not cached
    with torch.no_grad():
        ref = torch.log_softmax(stories.hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert len(first.prompt_logprobs) == len(prompt) - 1
    for j, lp in enumerate(first.prompt_logprobs, start=1):
        row = ref[j - 1]
        assert lp.token_id == prompt[j]
        assert lp.logprob == pytest.approx(row[prompt[j]].item(), abs=1e-4)
        # rank among near-ties (many unlikely tokens sit within fp32 noise of each other)
        assert int((row > lp.logprob + 1e-4).sum()) + 1 <= lp.rank <= int((row > lp.logprob - 1e-4).sum()) + 1
        assert [v for _, v in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_logit_bias_forces_and_bans_tokens_logprobs_unbiased(
    stories: RefModel, stories_engine: Engine
) -> None:
    """+100 forces a token (greedy and sampled), -100 bans the greedy one; the logprobs reported
    are the model's own (before the bias, vLLM's default), so they match transformers."""
    prompt = [1, 403, 407]
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    (unbiased,) = stories_engine.generate([prompt], plain)
    greedy = unbiased.token_ids[0]
    forced_id = next(t for t in range(5, stories.vocab_size) if t not in greedy)
    (forced,) = stories_engine.generate([prompt], replace(plain, logit_bias=((forced_id, 100.0),)))
    assert forced.token_ids[0] == [forced_id] * 6
    with torch.no_grad():
        logits = stories.hf(torch.tensor([prompt + [forced_id] * 6])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(forced.logprobs[0]):
        assert lp.logprob == pytest.approx(ref[len(prompt) - 1 + i, forced_id].item(), abs=1e-4)
    sampled = replace(plain, temperature=1.0, seed=3, logit_bias=((forced_id, 100.0),))
    (drawn,) = stories_engine.generate([prompt], sampled)
    assert drawn.token_ids[0] == [forced_id] * 6
    (banned,) = stories_engine.generate([prompt], replace(plain, logit_bias=((greedy[0], -100.0),)))
    assert banned.token_ids[0][0] == int(ref[len(prompt) - 1].topk(2).indices[1])
    assert greedy[0] not in banned.token_ids[0]
