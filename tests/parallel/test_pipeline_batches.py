"""Pipelining across steps (--pipeline-batches, the default P with P > 1; engine.py
`_step_pipelined`, pipeline.py `start_stage`): P batches of different steps in flight, each of
other requests. Greedy tokens equal T = P = 1 and transformers with many requests in flight (P = 2
with preemption and aborts under load, P = 3 with guided decoding, T = 2 x P = 2 with prefix-cache
hits); no sequence is ever in two batches in flight; the stages' timestamps show stage 0 computing
step n+1's batch while stage 1 computes step n's."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams
from tests.parallel.conftest import GroupRun, run_group
from tests.parallel.test_pipeline import _trace
from tests.worker.guided_testlib import REGEX, check_regex, decode, load_tokenizer
from tests.worker.worker_testlib import TINY, RefModel, load_ref, prompts_of_lengths

# 12 requests in flight; the long ones are chunked (budget 16)
LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5, 9, 22, 2, 14]
MAX_TOKENS = 10


def _options(model: Path, kv_cache_memory: str, pp: int, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--device", "cpu", "--cpu-threads", "1",
        "--kv-cache-memory", kv_cache_memory, "--max-num-batched-tokens", "16", "--max-model-len", "64",
        "--pipeline-parallel-size", str(pp), *extra,
    ]  # fmt: skip


def _check_batches(got: dict[str, Any], pp: int) -> None:
    batches = got["batches"]
    assert batches["shared"] == 0  # a sequence is never in two batches in flight
    assert batches["max_in_flight"] == pp, batches
    assert got["used_blocks"] == 0


def _check_logprobs(ours: list[float], theirs: list[float]) -> None:
    assert len(ours) == len(theirs)
    assert max((abs(a - b) for a, b in zip(ours, theirs, strict=True)), default=0.0) < 1e-4


def test_p2_batches_equal_t1_and_transformers_under_preemption_and_aborts(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """A 10-block cache for 12 requests of up to 50 tokens: sequences are preempted (never one in
    flight) and recomputed while two batches are in flight; two requests are aborted after the
    third step, one of them in a batch in flight (its rows are dropped when the batch is back).
    The others' tokens and logprobs are T = 1's and transformers', and every block comes back."""
    ref = tp_refs["llama_gqa"]
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=7)
    aborted = [2, 6]
    spec = {
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
        "logprobs": 3,
        "aborts": {"after_step": 3, "indices": aborted},
    }
    group = GroupRun(tmp_path, spec, *_options(ref.path, "40KiB", 2))
    single = ref.engine(kv_cache_memory="80KiB", max_num_batched_tokens=16, max_model_len=64)
    base = single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3))
    expected = [ref.greedy(prompt, MAX_TOKENS) for prompt in prompts]
    got = group.result()
    _check_batches(got, 2)
    assert got["num_preemptions"] > 0
    assert got["discarded_rows"] > 0  # an aborted request's rows came back from a batch in flight
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        tokens = got["tokens"][i].get("0", [])
        if i in aborted:
            assert got["finish_reasons"][i] == {"0": "abort"}
            assert tokens == expected[i][: len(tokens)] and len(tokens) < len(expected[i])
            continue
        assert result.token_ids[0] == expected[i]
        assert tokens == expected[i], f"prompt of {len(prompt)}"
        _check_logprobs(got["logprobs"][i], [lp.logprob for lp in result.logprobs[0]])


def test_p3_batches_with_guided_decoding_equal_p1(stories_dir: Path, tmp_path: Path) -> None:
    """P = 3 (stories260K's 5 layers: stages of 2, 2 and 1) with three batches in flight, a third of
    the requests guided by a regex: every request's tokens are P = 1's, the guided outputs match
    the regex, and the unguided ones are transformers'."""
    prompts = prompts_of_lengths(LENGTHS, 512, seed=11)
    guided = [["regex", REGEX] if i % 3 == 0 else None for i in range(len(prompts))]
    max_tokens = 24
    spec = {"prompts": prompts, "max_tokens": max_tokens, "guided": guided}
    group = GroupRun(tmp_path, spec, *_options(stories_dir, "1MiB", 3, "--max-model-len", "128"))
    single = Engine(
        WorkerConfig(
            model=str(stories_dir),
            device="cpu",
            kv_cache_memory="1MiB",
            max_num_batched_tokens=16,
            max_model_len=128,
        )
    )
    requests = []
    for i, (prompt, g) in enumerate(zip(prompts, guided, strict=True)):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        if g is not None:
            from services.worker.guided import GuidedSpec

            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, guided=GuidedSpec(*g))
        requests.append(EngineRequest(f"p1-{i}", tuple(prompt), params))
    base = single.run(requests)
    ref = load_ref(stories_dir)
    tokenizer = load_tokenizer(stories_dir)
    got = group.result()
    _check_batches(got, 3)
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        assert got["tokens"][i]["0"] == result.token_ids[0], f"prompt {i} of {len(prompt)}"
        if guided[i] is not None:
            check_regex(decode(tokenizer, result.token_ids[0]))
        else:
            assert result.token_ids[0] == ref.greedy(prompt, max_tokens)


@pytest.mark.slow
def test_t2_times_p2_batches_equal_t1_with_prefix_hits(tp_refs: dict[str, RefModel], tmp_path: Path) -> None:
    """T = 2 x P = 2 (stage 0's two ranks each finish their batches as rank 0 does): two rounds of
    12 requests, the second's prompts extending the first's (prefix-cache hits), equal T = 1 and
    transformers."""
    ref = tp_refs["llama_gqa"]
    first = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=13)
    tails = prompts_of_lengths([4] * len(first), ref.vocab_size, seed=14)
    second = [p + t[1:] for p, t in zip(first, tails, strict=True)]
    spec = {"rounds": [first, second], "max_tokens": MAX_TOKENS, "logprobs": 3}
    group = GroupRun(tmp_path, spec, *_options(ref.path, "4MiB", 2, "--tensor-parallel-size", "2"))
    single = ref.engine(kv_cache_memory="4MiB", max_num_batched_tokens=16, max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    base = single.generate(first, params) + single.generate(second, params, prefix="again")
    got = group.result()
    _check_batches(got, 2)
    assert sum(got["cached_tokens"][len(first) :]) > 0  # the second round hit the first's blocks
    for i, (prompt, result) in enumerate(zip(first + second, base, strict=True)):
        expected = ref.greedy(prompt, MAX_TOKENS)
        assert result.token_ids[0] == expected
        assert got["tokens"][i]["0"] == expected, f"prompt {i} of {len(prompt)}"
        _check_logprobs(got["logprobs"][i], [lp.logprob for lp in result.logprobs[0]])


def _heavy_llama(path: Path) -> Path:
    """Four layers (two a stage) heavy enough (hidden 1024) that a batch's layer takes longer on the CPU than
    rank 0's host work between two batches (receiving one back, sampling, scheduling the next)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "hidden_size": 1024, "intermediate_size": 4096}, num_hidden_layers=4)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def idle_fraction(records: dict[tuple[int, int, str, int], dict[str, Any]], stage: int) -> float:
    """The part of the run (from stage 0's first layers to its last batch back) in which `stage`
    computed no layers."""
    spans = sorted(
        (r["start"], r["end"]) for (s, _, e, _), r in records.items() if s == stage and e == "layers"
    )
    begin = min(r["start"] for (s, _, e, _), r in records.items() if s == 0 and e == "layers")
    end = max(r["end"] for (s, _, e, _), r in records.items() if s == 0 and e == "returned")
    busy = sum(b - a for a, b in spans)
    return 1 - busy / (end - begin)


def test_stage0_computes_step_n_plus_1_while_stage1_computes_step_n(tmp_path: Path) -> None:
    """With two batches in flight, every batch is one micro-batch and the trace's `step` is the
    batch's number (the same on every rank). Stage 0 starts batch n+1 before batch n came back
    from stage 1 in most consecutive pairs, and in some the two processes' intervals on the host
    clock intersect: stage 0 computed step n+1's batch while stage 1 computed step n's."""
    model = _heavy_llama(tmp_path / "model")
    prompts = prompts_of_lengths(LENGTHS, TINY["vocab_size"], seed=5)
    trace = tmp_path / "trace"
    options = ["--model", str(model), "--device", "cpu", "--cpu-threads", "1", "--kv-cache-memory", "4MiB"]
    options += ["--max-num-batched-tokens", "16", "--pipeline-parallel-size", "2"]
    got = run_group(
        tmp_path, {"prompts": prompts, "max_tokens": 16}, *options, "--pipeline-trace", str(trace)
    )
    _check_batches(got, 2)
    records = _trace(trace)
    steps = sorted(step for (stage, step, event, _) in records if stage == 0 and event == "layers")
    assert all(mb == 0 for (_, _, _, mb) in records)  # one micro-batch per batch
    assert len(steps) >= 20, steps
    ahead = overlapping = 0
    for n in steps[:-1]:
        s0_next = records[(0, n + 1, "layers", 0)]
        s1_this = records[(1, n, "layers", 0)]
        returned = records[(0, n, "returned", 0)]
        assert s1_this["end"] <= returned["end"]  # (the clock is the same in both processes)
        if s0_next["start"] < returned["end"]:  # stage 0 did not wait for batch n to come back
            ahead += 1
        if s1_this["start"] < s0_next["end"] and s0_next["start"] < s1_this["end"]:
            overlapping += 1
    idle = [idle_fraction(records, stage) for stage in (0, 1)]
    print(f"{ahead} of {len(steps) - 1} batches started ahead, {overlapping} overlapped; idle {idle}")
    (tmp_path / "idle.json").write_text(json.dumps(idle))
    assert ahead >= len(steps) // 2, f"{ahead} of {len(steps) - 1}"
    # (a pair misses it when stage 1 wakes up late on a busy machine; most do not)
    assert overlapping >= max(1, len(steps) // 8), f"{overlapping} of {len(steps) - 1} pairs overlapped"


def test_pipeline_batches_flag() -> None:
    base = {"model": "m", "pipeline_parallel_size": 2}
    assert WorkerConfig(**base).batches_in_flight == 2
    assert WorkerConfig(**base, pipeline_batches=1).batches_in_flight == 1
    assert WorkerConfig(model="m").batches_in_flight == 1
    assert WorkerConfig(**base, speculative="prompt-lookup").batches_in_flight == 1
    with pytest.raises(ValueError, match="--pipeline-batches 2 with --speculative"):
        WorkerConfig(**base, pipeline_batches=2, speculative="prompt-lookup")


STORY_STARTS = [
    "Once upon a time",
    "The little dog",
    "Lily went to the park",
    "One day, a boy named Tim",
    "The sun was",
    "There was a big tree",
    "Mom said",
    "A cat and a bird",
]


@pytest.mark.e2e
@pytest.mark.slow
def test_up_with_p2_serves_concurrent_streams_and_cancels(stories_dir: Path) -> None:
    """`tandem up` with a P = 2 worker (two batches in flight) over the OpenAI API: 16 concurrent
    streams give transformers' greedy text, a quarter of them closed by the client after a few
    chunks (the worker aborts them, some in a batch in flight), and the requests after all
    succeed with the same text."""
    from openai import OpenAI
    from tokenizers import Tokenizer

    from tests.e2e.stack import UpProcess

    tokenizer = Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
    ref = load_ref(stories_dir)
    prompts = [[1, *tokenizer.encode(text, add_special_tokens=False).ids] for text in STORY_STARTS]
    max_tokens = 24
    # (the completion's text as the styler detokenizes it: after the prompt's, its leading space kept)
    expected = [tokenizer.decode(p + ref.greedy(p, max_tokens))[len(tokenizer.decode(p)) :] for p in prompts]
    worker_args = (
        "--pipeline-parallel-size 2 --kv-cache-memory 8MiB --cpu-threads 1 --max-num-batched-tokens 16"
    )
    up = UpProcess(stories_dir, "--device", "cpu", "--worker-args", worker_args)
    try:
        up.wait_healthy(240)
        oai = OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0).with_options(timeout=120)
        texts: dict[int, str | None] = {}

        def run(i: int) -> None:
            stream = oai.completions.create(
                model="stories260K",
                prompt=prompts[i % len(prompts)],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            text = ""
            for k, chunk in enumerate(stream):
                text += chunk.choices[0].text if chunk.choices else ""
                if i % 4 == 3 and k == 2:  # the client goes away mid-stream
                    stream.close()
                    texts[i] = None
                    return
            texts[i] = text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads) and len(texts) == 16, texts
        for i, text in texts.items():
            if text is not None:
                assert text == expected[i % len(prompts)], i
        for i, prompt in enumerate(prompts[:4]):
            again = oai.completions.create(
                model="stories260K", prompt=prompt, max_tokens=max_tokens, temperature=0
            )
            assert again.choices[0].text == expected[i]
        assert "Traceback" not in up.output()
    finally:
        assert up.stop() == 0
