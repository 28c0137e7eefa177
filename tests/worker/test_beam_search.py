"""Beam search in the engine equals transformers' generate(num_beams=...); best_of ranks sampled
candidates; aborts mid-search give every KV block back (services/worker/beam_search.py,
fan_out.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from worker_testlib import TINY_BUILDERS, RefModel, load_ref, run_to_completion

from services.common.sampling import SamplingParams
from services.worker.engine import Engine, GenerateResult, collect
from services.worker.errors import InvalidRequestError
from services.worker.request import EngineRequest


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> dict[str, RefModel]:
    torch.manual_seed(0)
    out = {"stories": load_ref(stories_dir)}
    for name in ("llama", "qwen2"):
        path = tmp_path_factory.mktemp(f"beam-{name}")
        TINY_BUILDERS[name]().save_pretrained(str(path))
        out[name] = load_ref(path)
    return out


def hf_beams(
    ref: RefModel, prompt: list[int], *, width: int, n: int, stop: tuple[int, ...] = (), **kw: Any
) -> tuple[list[list[int]], list[float]]:
    """transformers' beam search: the n returned outputs and their (length-penalised) scores."""
    gc = GenerationConfig(
        num_beams=width,
        num_return_sequences=n,
        do_sample=False,
        eos_token_id=[*ref.eos_token_ids, *stop],
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    out = ref.hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=gc,
    )
    eos = {*ref.eos_token_ids, *stop}
    results = []
    for row in out.sequences:
        tokens = row[len(prompt) :].tolist()
        # drop the padding after a finished hypothesis (the stop token itself stays)
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        results.append(tokens[:end])
    # (num_beams=1 is greedy search in transformers: no scores; with one beam ours is greedy too)
    return results, out.sequences_scores.tolist() if width > 1 else []


def first_tokens(ref: RefModel, prompt: list[int], k: int) -> list[int]:
    """Tokens the model likes after `prompt`: used as extra stop ids so that beams do finish."""
    return ref.greedy(prompt, k)


def beam_requests(
    ref: RefModel, prompts: list[list[int]], setting: tuple[Any, ...], logprobs: int | None = None
) -> tuple[list[EngineRequest], list[tuple[list[list[int]], list[float]]]]:
    """A beam-search request per prompt under `setting` (width, n, length_penalty, early_stopping,
    max_tokens), with stop ids the beams meet (the greedy path's 2nd, 4th and 6th tokens:
    hypotheses finish early), and transformers' outputs and scores for each."""
    width, n, lp, es, max_tokens = setting
    requests, expected = [], []
    for i, prompt in enumerate(prompts):
        stop = tuple(dict.fromkeys(first_tokens(ref, prompt, 6)[1::2]))
        sp = SamplingParams(
            temperature=0.0,
            n=n,
            best_of=width,
            use_beam_search=True,
            length_penalty=lp,
            early_stopping=es,
            max_tokens=max_tokens,
            stop_token_ids=stop,
            logprobs=logprobs,
        )
        requests.append(EngineRequest(f"r{i}", tuple(prompt), sp))
        expected.append(
            hf_beams(
                ref,
                prompt,
                width=width,
                n=n,
                stop=stop,
                length_penalty=lp,
                early_stopping=es,
                max_new_tokens=max_tokens,
            )
        )
    return requests, expected


# (width, n, length_penalty, early_stopping, max_tokens)
SETTINGS = [
    (4, 4, 1.0, False, 24),
    (3, 2, 0.5, True, 24),
    (4, 1, 2.0, "never", 20),
    (2, 2, -1.0, False, 16),
    (5, 3, 0.0, "never", 16),
    (1, 1, 1.0, False, 12),
]


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
@pytest.mark.parametrize("model", ["stories", "llama", "qwen2"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[f"w{s[0]}n{s[1]}lp{s[2]}es{s[3]}" for s in SETTINGS])
def test_beam_search_equals_transformers(
    refs: dict[str, RefModel], model: str, setting: tuple[Any, ...], async_scheduling: str
) -> None:
    """Synchronous, and with async scheduling, where each beam step is launched before the host
    reads the one before (the next beams gathered on the device: beam_select.py)."""
    ref = refs[model]
    width, n, lp = setting[:3]
    prompts = (
        [[1, 403, 407, 315, 290], [1, 45, 99]] if model == "stories" else [[1, 45, 99, 7, 13, 200], [1, 9]]
    )
    # small blocks: forks copy partial blocks and share full ones
    engine = ref.engine(block_size=4, async_scheduling=async_scheduling)
    requests, expected = beam_requests(ref, prompts, setting, logprobs=2)
    results = run_to_completion(engine, requests)  # together: beams of both in every step
    assert (engine.scheduler.num_beam_steps_ahead > 0) == (async_scheduling == "on")
    if lp <= 0.5 and width > 1:  # (longer outputs win with a larger penalty) hypotheses ended on stop ids
        assert any(
            t[-1] in r.sampling.stop_token_ids
            for (ts, _), r in zip(expected, requests, strict=True)
            for t in ts
        )
    for i, (tokens, scores) in enumerate(expected):
        res = results[f"r{i}"]
        assert [res.token_ids[c] for c in range(n)] == tokens, f"prompt {i}"
        usage = res.usage
        assert usage is not None and usage.prompt_tokens == len(prompts[i])
        assert usage.completion_tokens == sum(len(t) for t in tokens)
        for c in range(n):
            logprobs = res.logprobs[c]
            assert [e.token_id for e in logprobs] == tokens[c]
            assert all(len(e.top) == 2 for e in logprobs)
            total = sum(e.logprob for e in logprobs)
            if scores:
                assert total / len(tokens[c]) ** lp == pytest.approx(scores[c], rel=1e-5, abs=1e-4)
            reason = res.finish_reasons[c]
            assert reason == (
                "stop"
                if tokens[c][-1] in (*ref.eos_token_ids, *requests[i].sampling.stop_token_ids)
                else "length"
            )


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_beam_search_cumulative_logprob_and_min_tokens(
    refs: dict[str, RefModel], async_scheduling: str
) -> None:
    ref = refs["llama"]
    prompt = [1, 45, 99, 7]
    stop = tuple(first_tokens(ref, prompt, 3)[1:2])
    engine = ref.engine(block_size=4, async_scheduling=async_scheduling)
    sp = SamplingParams(
        temperature=0.0,
        n=2,
        best_of=3,
        use_beam_search=True,
        max_tokens=10,
        min_tokens=4,
        stop_token_ids=stop,
    )
    request = engine.add_request(EngineRequest("m", tuple(prompt), sp))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert len(outputs) == 1, "a beam search says nothing until it ends"
    [out] = outputs
    tokens, _ = hf_beams(ref, prompt, width=3, n=2, stop=stop, max_new_tokens=10, min_new_tokens=4)
    assert [list(c.token_ids) for c in out.choices] == tokens
    assert all(c.cumulative_logprob is not None for c in out.choices)
    assert out.choices[0].logprobs is None  # not asked for
    assert request.is_finished and engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_beam_search_under_preemption_matches(refs: dict[str, RefModel], async_scheduling: str) -> None:
    """A KV cache too small for every beam of three requests: beams are preempted (recompute) and
    the step waits for them; the outputs do not change (async: steps ahead stop while the KV
    cache cannot take their fresh blocks)."""
    ref = refs["stories"]
    prompts = [[1, 403, 407, 315, 290, 300], [1, 45, 99, 300], [1, 50, 60, 70, 80]]
    sp = SamplingParams(temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=40)
    big = run_to_completion(
        ref.engine(block_size=4), [EngineRequest(f"b{i}", tuple(p), sp) for i, p in enumerate(prompts)]
    )
    engine = ref.engine(block_size=4, async_scheduling=async_scheduling)
    bm = engine.block_manager
    hold = [bm.allocate_block() for _ in range(bm.num_free_blocks - 40)]  # leave 40 blocks to the requests
    results = {r: GenerateResult(r) for r in big}
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"b{i}", tuple(p), sp))
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
    assert engine.scheduler.num_preemptions > 0
    for rid, res in results.items():
        assert res.token_ids == big[rid].token_ids
    for b in hold:
        bm.release_block(b)
    assert bm.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_abort_mid_beam_search_frees_every_block(refs: dict[str, RefModel], async_scheduling: str) -> None:
    """(async: the step launched ahead holds fresh blocks of the aborted beams)"""
    ref = refs["stories"]
    engine = ref.engine(block_size=4, async_scheduling=async_scheduling)
    bm = engine.block_manager
    free_before = bm.num_free_blocks
    sp = SamplingParams(temperature=0.0, n=3, best_of=6, use_beam_search=True, max_tokens=60, ignore_eos=True)
    engine.add_request(EngineRequest("a", (1, 403, 407, 315, 290), sp))
    engine.add_request(EngineRequest("b", (1, 45, 99), sp))
    for _ in range(7):
        engine.step()
    assert bm.num_free_blocks < free_before
    final = engine.abort("a")
    assert final is not None and final.finished
    assert [c.finish_reason for c in final.choices] == ["abort"] * 3
    for _ in range(3):
        engine.step()
    engine.abort("b")
    assert not engine.has_unfinished()
    assert bm.num_free_blocks == free_before
    assert all(count == 0 for count in bm.ref_counts)
    assert (engine.scheduler.num_beam_steps_ahead > 0) == (async_scheduling == "on")


def test_best_of_returns_the_most_likely_candidates(refs: dict[str, RefModel]) -> None:
    """best_of=5, n=2 with a seed: the 2 returned are, of the 5 choices the same seed samples
    with n=5, the two with the highest cumulative logprob, most likely first."""
    ref = refs["stories"]
    prompt = (1, 403, 407, 315)
    engine = ref.engine()
    base = SamplingParams(temperature=1.0, seed=7, max_tokens=12, n=5, logprobs=0)
    [all5] = engine.generate([list(prompt)], base)
    totals = {c: sum(e.logprob for e in all5.logprobs[c]) for c in range(5)}
    ranked = sorted(totals, key=lambda c: -totals[c])
    [best] = engine.generate(
        [list(prompt)], SamplingParams(temperature=1.0, seed=7, max_tokens=12, n=2, best_of=5)
    )
    assert best.token_ids == {0: all5.token_ids[ranked[0]], 1: all5.token_ids[ranked[1]]}
    assert best.logprobs == {}  # not asked for
    assert best.usage is not None and best.usage.prompt_tokens == len(prompt)
    assert best.usage.completion_tokens == sum(len(t) for t in all5.token_ids.values())
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
    ],
)
def test_beam_search_refuses_what_it_does_not_support(
    refs: dict[str, RefModel], overrides: dict[str, Any], field: str
) -> None:
    engine: Engine = refs["stories"].engine()
    params: dict[str, Any] = {"temperature": 0.0, "use_beam_search": True, "max_tokens": 4}
    params.update(overrides)
    with pytest.raises(InvalidRequestError, match=f"sampling.{field}"):
        engine.add_request(EngineRequest("x", (1, 2, 3), SamplingParams(**params)))


@pytest.mark.parametrize(("field", "value"), [("length_penalty", 0.5), ("early_stopping", True)])
def test_beam_fields_without_beam_search_are_refused(
    refs: dict[str, RefModel], field: str, value: Any
) -> None:
    engine = refs["stories"].engine()
    with pytest.raises(InvalidRequestError, match=f"sampling.{field}"):
        engine.add_request(EngineRequest("x", (1, 2, 3), SamplingParams(**{field: value})))


def test_beam_search_with_async_scheduling_matches(refs: dict[str, RefModel]) -> None:
    """Async scheduling never launches a beam's next step ahead (its input ids are the beam
    step's picks; a step holding a beam is synchronous): the output is the synchronous engine's,
    beside a plain request that runs ahead once the beams are done."""
    ref = refs["qwen2"]
    beam = SamplingParams(temperature=0.0, n=2, best_of=3, use_beam_search=True, max_tokens=12)
    plain = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)  # outlives the beams
    requests = [EngineRequest("beam", (1, 45, 99, 7), beam), EngineRequest("plain", (1, 9, 8), plain)]
    sync = run_to_completion(ref.engine(block_size=4), requests)
    engine = ref.engine(block_size=4, async_scheduling="on")
    ahead = run_to_completion(engine, requests)
    assert {r: res.token_ids for r, res in ahead.items()} == {r: res.token_ids for r, res in sync.items()}
    assert engine.num_continuations > 0


@pytest.mark.parametrize("ahead_kernel", [False, True], ids=["torch", "beam-ahead-kernel"])
def test_beam_steps_ahead_of_different_widths_beside_sampling_match(
    refs: dict[str, RefModel], ahead_kernel: bool
) -> None:
    """Steps launched ahead whose beam requests have different widths (the selection pads the
    narrower one's rows) beside a sampled request (the step's input ids and tables are partly the
    host's): the synchronous engine's output; also with the inputs of the steps ahead made by
    kernels/triton/beam_ahead.py (CUDA's, here on Triton's interpreter)."""
    ref = refs["llama"]
    wide = SamplingParams(
        temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=14, ignore_eos=True
    )
    narrow = SamplingParams(
        temperature=0.0, n=1, best_of=2, use_beam_search=True, max_tokens=14, ignore_eos=True
    )
    plain = SamplingParams(temperature=1.0, seed=5, max_tokens=18, ignore_eos=True)
    requests = [
        EngineRequest("wide", (1, 45, 99, 7, 13), wide),
        EngineRequest("plain", (1, 9, 8), plain),
        EngineRequest("narrow", (1, 9), narrow),
    ]
    sync = run_to_completion(ref.engine(block_size=4), requests)
    engine = ref.engine(block_size=4, async_scheduling="on")
    calls = []
    if ahead_kernel:
        from kernels.triton.beam_ahead import beam_ahead

        def counted(*args: Any) -> Any:
            calls.append(args[-1] is not None)  # (positions: the beams among other rows)
            return beam_ahead(*args)

        engine.runner.beams.beam_ahead = counted
    ahead = run_to_completion(engine, requests)
    assert {r: res.token_ids for r, res in ahead.items()} == {r: res.token_ids for r, res in sync.items()}
    assert engine.scheduler.num_beam_steps_ahead > 0
    assert engine.block_manager.num_used_blocks == 0
    assert not ahead_kernel or any(calls)


def test_prefill_and_resume_refuse_beam_search(refs: dict[str, RefModel]) -> None:
    engine = refs["stories"].engine()
    beam = SamplingParams(temperature=0.0, use_beam_search=True, max_tokens=4)
    with pytest.raises(InvalidRequestError, match=r"sampling\.use_beam_search"):
        engine.add_request(EngineRequest("p", (1, 2, 3), beam, hold_kv=True))
    with pytest.raises(InvalidRequestError, match="generated_token_ids"):
        engine.add_request(EngineRequest("g", (1, 2, 3), beam, generated_token_ids=(5,)))
    with pytest.raises(InvalidRequestError, match=r"sampling\.best_of"):
        engine.add_request(EngineRequest("b", (1, 2, 3), SamplingParams(n=1, best_of=10_000)))


def test_beam_search_with_blocks_freed_out_of_the_window(tmp_path: Path) -> None:
    """A model whose every layer slides (window 8): beams fork tables whose leading blocks were
    freed (placeholders), and the output still equals transformers'."""
    torch.manual_seed(1)
    TINY_BUILDERS["mistral_sw"]().save_pretrained(str(tmp_path))
    ref = load_ref(tmp_path)
    prompt = [1, 45, 99, 7, 13, 200, 31, 17, 60, 61, 62]
    engine = ref.engine(block_size=4)
    sp = SamplingParams(temperature=0.0, n=2, best_of=3, use_beam_search=True, max_tokens=24)
    [res] = engine.generate([prompt], sp)
    expected, _ = hf_beams(ref, prompt, width=3, n=2, max_new_tokens=24)
    assert [res.token_ids[c] for c in range(2)] == expected
    assert engine.block_manager.num_window_freed_blocks > 0
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_beam_search_beside_speculative_decoding(refs: dict[str, RefModel], async_scheduling: str) -> None:
    """With prompt-lookup speculation on, beams are never drafted (their next token is the beam
    step's pick): the beams equal transformers' and a greedy request beside them still drafts
    (async: drafted steps are synchronous, the others may run ahead, beams included)."""
    ref = refs["stories"]
    prompt = [1, 403, 407, 315, 290, 403, 407, 315]
    engine = ref.engine(
        block_size=4, speculative="prompt-lookup", num_speculative_tokens=3, async_scheduling=async_scheduling
    )
    beam = SamplingParams(temperature=0.0, n=2, best_of=3, use_beam_search=True, max_tokens=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    results = run_to_completion(
        engine, [EngineRequest("beam", tuple(prompt), beam), EngineRequest("greedy", tuple(prompt), greedy)]
    )
    expected, _ = hf_beams(ref, prompt, width=3, n=2, max_new_tokens=16)
    assert [results["beam"].token_ids[c] for c in range(2)] == expected
    assert results["greedy"].token_ids[0] == ref.greedy(prompt, 32)


def test_beam_selection_runs_on_the_device_unless_a_beam_was_preempted(refs: dict[str, RefModel]) -> None:
    """Every step of a beam search whose beams are all computed together selects on the device
    (beam_select.py): the host merges nothing. A beam computed again after a preemption, in two
    chunks (no prefix cache to take its blocks from), meets the others' rows of an earlier step: that step is merged on the host, and the
    output still equals transformers'."""
    ref = refs["stories"]
    prompt = [1, 403, 407, 315, 290, 300, 45, 99, 50, 60, 70, 80]
    sp = SamplingParams(temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=24)
    expected, _ = hf_beams(ref, prompt, width=4, n=2, max_new_tokens=24)
    for preempt in (False, True):
        engine = ref.engine(block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
        request = engine.add_request(EngineRequest("b", tuple(prompt), sp))
        result = GenerateResult("b")
        while engine.has_unfinished():
            beam = request.beam
            if preempt and beam.num_steps == 6 and len(beam.live) == 4 and not beam.rows:
                engine.scheduler._preempt(beam.live[-1])  # what KV pressure does: recompute
                preempt = False
            for out in engine.step():
                collect(result, out)
        assert [result.token_ids[c] for c in range(2)] == expected
        assert request.beam.num_steps > 6
        assert request.beam.num_host_merges == (1 if engine.scheduler.num_preemptions else 0)
        assert engine.block_manager.num_used_blocks == 0


def test_beam_search_with_exact_ties_is_deterministic(tmp_path: Path) -> None:
    """Tokens in twin pairs (the same embedding and LM-head row): beams meet exact ties in every
    step. Equal totals go in (beam, token id) order (beam_select.ordered_topk), whatever else runs
    in the step: alone, beside a request of another width, or under preemption, the same beams."""
    torch.manual_seed(2)
    model = TINY_BUILDERS["llama"]()
    with torch.no_grad():
        for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
            weight[1::2] = weight[0::2]
    model.save_pretrained(str(tmp_path))
    ref = load_ref(tmp_path)
    beam = SamplingParams(temperature=0.0, n=3, best_of=4, use_beam_search=True, max_tokens=16)
    other = SamplingParams(temperature=0.0, n=2, best_of=6, use_beam_search=True, max_tokens=16, logprobs=20)
    prompt = (1, 44, 98, 6)
    [alone] = ref.engine(block_size=4).generate([list(prompt)], beam)
    batched = run_to_completion(
        ref.engine(block_size=4), [EngineRequest("t", prompt, beam), EngineRequest("o", (1, 9, 12), other)]
    )
    assert batched["t"].token_ids == alone.token_ids
    outputs = [alone.token_ids[c] for c in range(3)]
    assert len({tuple(o) for o in outputs}) == 3


@pytest.mark.gpu
def test_beam_search_on_cuda_equals_transformers(refs: dict[str, RefModel]) -> None:
    """The device selection on CUDA (fp32, CUDA graphs), beam steps launched ahead (async
    scheduling, on by default with CUDA)."""
    ref = refs["stories"]
    prompts = [[1, 403, 407, 315, 290], [1, 45, 99]]
    sp = SamplingParams(temperature=0.0, n=2, best_of=4, use_beam_search=True, max_tokens=24, logprobs=2)
    engine = ref.engine(device="cuda", dtype="float32")
    requests = [EngineRequest(f"g{i}", tuple(p), sp) for i, p in enumerate(prompts)]
    added = [engine.add_request(r) for r in requests]
    results = {r.request_id: GenerateResult(r.request_id) for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
    for i, prompt in enumerate(prompts):
        expected, _ = hf_beams(ref, prompt, width=4, n=2, max_new_tokens=24)
        assert [results[f"g{i}"].token_ids[c] for c in range(2)] == expected
    assert all(r.beam.num_steps > 1 and r.beam.num_host_merges == 0 for r in added)
    assert engine.scheduler.num_beam_steps_ahead > 0
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("one_launch", [False, True], ids=["three-launches", "one-launch"])
def test_beam_search_with_the_cuda_selection_kernels_equals_transformers(
    refs: dict[str, RefModel], one_launch: bool
) -> None:
    """The runner's selection on CUDA (kernels/triton/row_topk.py and beam_candidates.py, or both
    in one launch: beam_topk_candidates.py; here on Triton's interpreter in place of the torch ops)
    and the inputs of its steps launched ahead (beam_ahead.py), stop ids met: the output is
    transformers'."""
    from kernels.triton.beam_ahead import beam_ahead
    from kernels.triton.beam_candidates import beam_candidates
    from kernels.triton.beam_topk_candidates import beam_topk_candidates
    from kernels.triton.row_topk import row_topk

    ref = refs["qwen2"]
    n = 2
    engine = ref.engine(block_size=4, async_scheduling="on")
    calls = []

    def counted(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            calls.append(1)
            return fn(*args)

        return call

    beams = engine.runner.beams
    beams.row_topk, beams.beam_candidates = row_topk, beam_candidates
    if one_launch:
        beams.topk_candidates = counted(beam_topk_candidates)
    else:
        beams.beam_candidates = counted(beam_candidates)
    beams.beam_ahead = beam_ahead
    requests, expected = beam_requests(ref, [[1, 45, 99, 7, 13, 200], [1, 9]], (4, n, 0.5, True, 12))
    results = run_to_completion(engine, requests)
    assert engine.scheduler.num_beam_steps_ahead > 0 and calls
    for i, (tokens, _) in enumerate(expected):
        assert [results[f"r{i}"].token_ids[c] for c in range(n)] == tokens, f"prompt {i}"
