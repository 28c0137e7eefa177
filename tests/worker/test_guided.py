"""Guided decoding in the engine: regex, choice, JSON schema and JSON object constraints hold for
sampled outputs of the real stories260K (decoded with its tokenizer, checked with `re`, `json`
and `jsonschema`), alongside unconstrained requests that stay token-for-token unchanged, across
resume, preemption and async scheduling."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from guided_testlib import (
    CHECKS,
    CHOICE_SPEC,
    CHOICES,
    JSON_OBJECT_SPEC,
    REGEX_SPEC,
    SCHEMA_SPEC,
    SPECS,
    check_json_object,
    check_schema,
    decode,
    load_tokenizer,
    save_tiny_llama,
)
from tokenizers import Tokenizer
from worker_testlib import run_to_completion

from services.worker.config import WorkerConfig
from services.worker.engine import Engine, GenerateResult, collect
from services.worker.guided import GrammarCompiler, GuidedRows, GuidedSpec, apply_token_mask
from services.worker.kv_cache import block_bytes
from services.worker.model_config import ModelConfigError
from services.worker.request import EngineRequest, InvalidRequestError, SamplingParams

COMMON: dict[str, Any] = dict(device="cpu", kv_cache_memory="16MiB", max_model_len=256, cpu_threads=1)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def engine(stories_dir: Path) -> Engine:
    return Engine(WorkerConfig(model=str(stories_dir), **COMMON))


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = tokenizer.encode("Once upon a time, there was a girl named").ids  # <s> first
    assert ids[0] == 1
    return ids


def text_of(tokenizer: Tokenizer, result: GenerateResult, index: int = 0) -> str:
    ids = result.token_ids[index]
    if result.stop_token_ids.get(index) is not None:  # an end token where the grammar accepted
        ids = ids[:-1]
    return decode(tokenizer, ids)


@pytest.mark.parametrize("kind", ["regex", "choice", "json_schema"])
def test_sampled_outputs_match_the_constraint(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int], kind: str
) -> None:
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120, guided=SPECS[kind]) for s in range(6)]
    params.append(SamplingParams(temperature=0.0, max_tokens=120, guided=SPECS[kind]))
    results = engine.generate([prompt] * len(params), params, prefix=kind)
    texts = set()
    for result in results:
        assert result.finish_reasons == {0: "stop"}, result
        assert result.stop_token_ids == {0: None}  # completed by the grammar, not by an EOS
        text = text_of(tokenizer, result)
        CHECKS[kind](text)
        texts.add(text)
    assert len(texts) > 1 or kind == "choice"  # sampling still samples


def test_json_object_on_a_uniform_model(tmp_path: Path, stories_dir: Path, tokenizer: Tokenizer) -> None:
    """Every allowed token equally likely (zero LM head): the constraint alone shapes the output.
    A dummy-weight directory has no tokenizer: --tokenizer points at the real one."""
    model = save_tiny_llama(tmp_path / "uniform", uniform=True)
    engine = Engine(WorkerConfig(model=str(model), tokenizer=str(stories_dir / "tokenizer.json"), **COMMON))
    max_tokens = 48
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, guided=JSON_OBJECT_SPEC)
        for s in range(12)
    ]
    results = engine.generate([[1, 5, 6]] * len(params), params)
    stopped = 0
    for result in results:
        if result.finish_reasons[0] == "stop":
            check_json_object(text_of(tokenizer, result))
            stopped += 1
        else:  # an object cut by max_tokens: LENGTH, never an invalid "complete" output
            assert result.finish_reasons[0] == "length" and len(result.token_ids[0]) == max_tokens
    assert stopped >= 3


def test_mixed_batch_leaves_unguided_requests_unchanged(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    greedy = EngineRequest(
        "greedy", (1, 403, 407), SamplingParams(temperature=0.0, max_tokens=40, logprobs=2)
    )
    seeded = EngineRequest("seeded", (1, 306, 260), SamplingParams(temperature=0.8, seed=7, max_tokens=40))
    alone = run_to_completion(engine, [greedy, seeded])
    guided = [
        EngineRequest(
            "regex-n2", tuple(prompt), SamplingParams(temperature=1.0, seed=3, n=2, guided=REGEX_SPEC)
        ),
        EngineRequest("schema", tuple(prompt), SamplingParams(temperature=1.0, seed=4, guided=SCHEMA_SPEC)),
    ]
    mixed = run_to_completion(engine, [guided[0], greedy, guided[1], seeded])
    for rid in ("greedy", "seeded"):
        assert mixed[rid].token_ids == alone[rid].token_ids
        assert mixed[rid].finish_reasons == alone[rid].finish_reasons
    assert [lp.logprob for lp in mixed["greedy"].logprobs[0]] == pytest.approx(
        [lp.logprob for lp in alone["greedy"].logprobs[0]], abs=1e-5
    )
    assert sorted(mixed["regex-n2"].finish_reasons) == [0, 1]
    for index in (0, 1):
        CHECKS["regex"](text_of(tokenizer, mixed["regex-n2"], index))
    check_schema(text_of(tokenizer, mixed["schema"]))


def test_logprobs_are_of_the_masked_distribution(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    (result,) = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, logprobs=5, guided=CHOICE_SPEC)
    )
    text = text_of(tokenizer, result)
    assert text in CHOICES
    lps = result.logprobs[0]
    assert [lp.token_id for lp in lps] == result.token_ids[0]
    # The first token starts one of the choices; so does every alternative offered for it.
    for token_id, logprob in [(lps[0].token_id, lps[0].logprob), *lps[0].top]:
        assert math.isfinite(logprob)
        piece = decode(tokenizer, [token_id])
        assert any(choice.startswith(piece) for choice in CHOICES), piece
    for lp in lps:
        assert lp.rank == 1 and lp.top[0][0] == lp.token_id  # greedy on the masked logits
        assert len(lp.top) <= 5 and all(math.isfinite(v) for _, v in lp.top)
    total = sum(math.exp(v) for _, v in lps[0].top)
    assert total == pytest.approx(1.0, abs=1e-4) or len(lps[0].top) == 5  # renormalised over allowed tokens


def test_resume_continues_inside_the_grammar(engine: Engine, tokenizer: Tokenizer, prompt: list[int]) -> None:
    for sp in (
        SamplingParams(temperature=0.0, max_tokens=100, guided=SCHEMA_SPEC),
        SamplingParams(temperature=1.0, seed=11, max_tokens=100, guided=SCHEMA_SPEC),
    ):
        (full,) = engine.generate([prompt], sp, prefix="full")
        tokens = full.token_ids[0]
        assert full.finish_reasons[0] == "stop" and len(tokens) > 6
        for cut in (1, len(tokens) // 2, len(tokens) - 1):
            resumed = run_to_completion(
                engine, [EngineRequest(f"resume-{cut}", tuple(prompt), sp, tuple(tokens[:cut]))]
            )
            result = resumed[f"resume-{cut}"]
            assert tokens[:cut] + result.token_ids[0] == tokens
            assert result.finish_reasons[0] == "stop"
            check_schema(decode(tokenizer, tokens[:cut] + result.token_ids[0]))


def test_resume_outside_the_grammar_is_refused(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=50, guided=SCHEMA_SPEC)
    not_json = tuple(tokenizer.encode("Lily", add_special_tokens=False).ids)
    with pytest.raises(
        InvalidRequestError, match=r"generated_token_ids: not a valid output of sampling\.guided"
    ):
        engine.add_request(EngineRequest("bad-resume", tuple(prompt), sp, not_json))
    (done,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, guided=CHOICE_SPEC))
    with pytest.raises(InvalidRequestError, match="already a complete output"):
        engine.add_request(
            EngineRequest("done", tuple(prompt), replace(sp, guided=CHOICE_SPEC), tuple(done.token_ids[0]))
        )
    assert not engine.has_unfinished()


def test_max_tokens_mid_output_is_length(engine: Engine, tokenizer: Tokenizer, prompt: list[int]) -> None:
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, guided=SCHEMA_SPEC))
    assert result.finish_reasons == {0: "length"} and len(result.token_ids[0]) == 6
    text = decode(tokenizer, result.token_ids[0])
    assert '{"name": "'.startswith(text) or text.startswith('{"name": "')  # a cut JSON prefix


def test_end_tokens_only_where_the_output_is_complete(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    """`[0-9]{1,3}` accepts after one digit: an EOS may end it there, never before."""
    spec = GuidedSpec("regex", "[0-9]{1,3}")
    params = [SamplingParams(temperature=1.5, seed=s, max_tokens=10, guided=spec) for s in range(10)]
    results = engine.generate([prompt] * len(params), params, prefix="digits")
    for result in results:
        assert result.finish_reasons[0] == "stop"
        stop = result.stop_token_ids[0]
        assert stop is None or stop in engine.model_config.eos_token_ids
        assert len(text_of(tokenizer, result)) in (1, 2, 3) and text_of(tokenizer, result).isdigit()
    # ignore_eos: no end token is allowed; the output ends when the grammar cannot go on
    params = [
        SamplingParams(temperature=1.5, seed=s, max_tokens=10, ignore_eos=True, guided=spec) for s in range(4)
    ]
    for result in engine.generate([prompt] * 4, params, prefix="digits-noeos"):
        assert result.finish_reasons[0] == "stop" and result.stop_token_ids[0] is None
        assert len(decode(tokenizer, result.token_ids[0])) == 3


def test_preemption_keeps_the_matchers(stories_dir: Path, tokenizer: Tokenizer, prompt: list[int]) -> None:
    probe = Engine(WorkerConfig(model=str(stories_dir), **COMMON))
    per_block = block_bytes(probe.model_config, probe.config.block_size, probe.dtype)
    small = Engine(
        WorkerConfig(
            model=str(stories_dir),
            **{**COMMON, "kv_cache_memory": str(per_block * 12), "max_model_len": 128},
            max_num_batched_tokens=32,
            enable_prefix_caching=False,
        )
    )
    reqs = [
        EngineRequest(
            f"r{i}",
            tuple(prompt[: 6 + i]),
            SamplingParams(
                temperature=1.0, seed=i, max_tokens=100, guided=SCHEMA_SPEC if i % 2 else REGEX_SPEC
            ),
        )
        for i in range(8)
    ]
    reference = run_to_completion(probe, reqs)
    constrained = run_to_completion(small, reqs)
    assert small.scheduler.num_preemptions > 0
    for rid, expected in reference.items():
        assert constrained[rid].token_ids == expected.token_ids, rid
        assert constrained[rid].finish_reasons == {0: "stop"}
        check = check_schema if int(rid[1:]) % 2 else CHECKS["regex"]
        check(text_of(tokenizer, constrained[rid]))


def test_async_scheduling_gives_the_same_outputs(
    stories_dir: Path, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    def requests() -> Iterator[EngineRequest]:
        for i in range(6):
            guided = SCHEMA_SPEC if i % 3 == 0 else (REGEX_SPEC if i % 3 == 1 else None)
            sp = SamplingParams(temperature=1.0, seed=i, max_tokens=120 if guided else 150, guided=guided)
            yield EngineRequest(f"r{i}", tuple(prompt[: 5 + i]), sp)

    sync = run_to_completion(
        Engine(WorkerConfig(model=str(stories_dir), async_scheduling="off", **COMMON)), list(requests())
    )
    overlap_engine = Engine(WorkerConfig(model=str(stories_dir), async_scheduling="on", **COMMON))
    overlap = run_to_completion(overlap_engine, list(requests()))
    assert overlap_engine.num_continuations > 0  # once the guided requests are done
    for rid, expected in sync.items():
        assert overlap[rid].token_ids == expected.token_ids, rid
        assert overlap[rid].finish_reasons == expected.finish_reasons
    check_schema(text_of(tokenizer, overlap["r0"]))
    CHECKS["regex"](text_of(tokenizer, overlap["r1"]))


def test_bad_constraints_and_no_tokenizer(engine: Engine, tmp_path: Path) -> None:
    assert engine.grammars is not None
    for spec, field in [
        (GuidedSpec("regex", "[a-"), "sampling.guided.regex"),
        (GuidedSpec("json_schema", '{"type": "nope"}'), "sampling.guided.json_schema"),
        (GuidedSpec("json_schema", "{not json"), "sampling.guided.json_schema"),
        (GuidedSpec("lark_grammar", "start: missing_rule"), "sampling.guided.lark_grammar"),
        (GuidedSpec("regex", "x{0}"), "sampling.guided.regex"),  # only the empty output
    ]:
        with pytest.raises(InvalidRequestError) as info:
            engine.grammars.compile(spec)
        assert str(info.value).startswith(field + ": ") and info.value.field == field
    model = save_tiny_llama(tmp_path / "no-tokenizer", uniform=False)
    bare = Engine(WorkerConfig(model=str(model), **COMMON))
    assert bare.grammars is None and "tokenizer" in bare.guided_unavailable
    with pytest.raises(ModelConfigError, match="--tokenizer"):
        Engine(WorkerConfig(model=str(model), tokenizer=str(tmp_path / "missing.json"), **COMMON))


def test_grammar_cache_is_a_bounded_lru(stories_dir: Path) -> None:
    compiler = GrammarCompiler.load(str(stories_dir), 512, (2,))
    compiler.cache_size = 2
    a, b, c = (GuidedSpec("regex", f"{ch}+") for ch in "abc")
    first = compiler.compile(a)
    assert compiler.compile(a) is first
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.compile(a) is first
    assert list(compiler._cache) == [c, a]


def test_apply_token_mask_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=gen)
    allowed = torch.rand(2, 100, generator=gen) < 0.3
    words = torch.zeros(2, 4, dtype=torch.int64)
    for row in range(2):
        for t in allowed[row].nonzero().flatten().tolist():
            words[row, t // 32] |= 1 << (t % 32)
    masks = words.to(torch.int32)  # wraps bit 31 into the sign, as llguidance's int32 words do
    original = logits.clone()
    out = apply_token_mask(logits, GuidedRows([1, 3], masks))
    expected = logits.clone()
    for row, target in ((0, 1), (1, 3)):
        expected[target, ~allowed[row]] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(logits, original)  # out of place: the input may be a CUDA graph's buffer


def test_a_matcher_failure_ends_the_whole_request(engine: Engine, prompt: list[int]) -> None:
    """llguidance failing mid-generation (here: a matcher put in its error state by hand, as a
    resource limit would) ends every choice of the request with an error, and frees its blocks."""
    engine.add_request(EngineRequest("fails", tuple(prompt), SamplingParams(n=2, seed=1, guided=SCHEMA_SPEC)))
    result = GenerateResult("fails")
    for out in engine.step():  # the prompt and each choice's first token
        collect(result, out)
    request = engine.requests["fails"]
    state = request.sequences[0].guided
    assert state is not None and not state.complete
    state.matcher.consume_token(2)  # EOS inside an unfinished object: the matcher errs from now on
    while engine.has_unfinished():
        for out in engine.step():
            collect(result, out)
    assert result.error is not None and result.error.startswith("guided decoding failed: ")
    assert result.finish_reasons == {0: "abort", 1: "abort"}
    assert engine.block_manager.num_used_blocks == 0


def test_a_stop_token_id_that_is_also_text_ends_only_a_complete_output(
    engine: Engine, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    """stop_token_ids are end tokens even when the grammar could read them as text: never first."""
    spec = GuidedSpec("regex", "[0-9]{1,3}")
    digits = [tokenizer.token_to_id(d) or 0 for d in "0123456789"]
    assert all(digits)
    params = [
        SamplingParams(temperature=1.5, seed=s, max_tokens=10, stop_token_ids=tuple(digits), guided=spec)
        for s in range(8)
    ]
    results = engine.generate([prompt] * len(params), params, prefix="digit-stops")
    ended_by_digit = 0
    for result in results:
        tokens, stop = result.token_ids[0], result.stop_token_ids[0]
        assert result.finish_reasons[0] == "stop" and tokens[0] not in digits
        ended_by_digit += stop in digits
        assert text_of(tokenizer, result).isdigit()  # at least one digit before any end token
    assert ended_by_digit > 0


def test_a_zero_noise_draw_never_picks_a_masked_token() -> None:
    """The old GPU noise was exactly 0 for about one vocabulary entry in 2**24 (its 24-bit uniform
    rounded to 1.0); 0 / 0 = NaN then won the argmax for a masked token (seen on an H200 with a
    152k vocabulary: ~1% of guided steps). The draws of sampling_rng.py stay strictly inside
    (0, 1): over a 152k vocabulary and many rows no noise is 0 and a masked token never wins."""
    from services.worker.sampler import Sampler, SamplingMetadata
    from services.worker.sampling_rng import draw_table, exponential

    rows, vocab = 16, 151936
    draws = draw_table([(99645 + r, 0, r) for r in range(rows)])
    assert (exponential(draws, vocab) > 0).all()
    logits = torch.zeros(rows, vocab)
    logits[:, 1::2] = float("-inf")  # masked (or filtered, or banned)
    ones, zeros = torch.ones(rows), torch.zeros(rows)
    meta = SamplingMetadata(
        greedy=torch.zeros(rows, dtype=torch.bool),
        temperature=ones,
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=ones,
        min_p=zeros,
        repetition_penalty=ones,
        presence_penalty=zeros,
        frequency_penalty=zeros,
        output_ids=[[]] * rows,
        prompt_ids=[[]] * rows,
        banned_ids=[[]] * rows,
        draws=draws,
        num_logprobs=[None] * rows,
        all_greedy=False,
        need_filter=False,
        need_penalties=False,
    )
    token_ids, _ = Sampler().sample_tensors(logits, meta)
    assert all(t % 2 == 0 for t in token_ids.tolist())
