"""Async scheduling (step N+1 planned and launched before step N's tokens are read) gives exactly
the outputs of the synchronous engine, step by step, on the CPU reference path.

The engine is driven by a script (requests arriving late, aborts between steps) and every step's
outputs are recorded; the two modes must produce the same stream: the same tokens in the same
step, the same finish reasons, usage and KV blocks left. Each scenario also checks that the
overlap really happened (continuations launched) and, where a sequence stops on a sampled token
or is aborted mid-flight, that the speculative rows were discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from services.common.config import parse_config
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import EngineRequest, SamplingParams

STORIES_BLOCK_BYTES = 5 * 2 * 16 * 4 * 8 * 4  # layers x K/V x block x kv heads x head_dim x fp32


@dataclass
class Script:
    requests: dict[int, list[EngineRequest]]  # step index -> requests added before that step
    aborts: dict[int, list[str]] = field(default_factory=dict)  # step index -> ids aborted before it


@dataclass
class Run:
    steps: list[list[tuple[Any, ...]]]  # per step: (request id, choices, finished, usage) per output
    logprobs: list[float]
    engine: Engine


def _engine(model: Path, mode: str, **overrides: Any) -> Engine:
    options: dict[str, Any] = dict(
        model=str(model), async_scheduling=mode, kv_cache_memory="4MiB", max_num_seqs=8, max_model_len=256
    )
    return Engine(WorkerConfig(**{**options, **overrides}))


def _drive(engine: Engine, script: Script, max_steps: int = 2000) -> Run:
    steps: list[list[tuple[Any, ...]]] = []
    logprobs: list[float] = []
    last = max([*script.requests, *script.aborts])
    for index in range(max_steps):
        for req in script.requests.get(index, []):
            engine.add_request(req)
        outputs = [engine.abort(rid) for rid in script.aborts.get(index, [])]
        if engine.has_unfinished():
            outputs += engine.step()
        elif index > last:
            break
        record = []
        for out in outputs:
            if out is None:
                continue
            choices = tuple((c.index, c.token_ids, c.finish_reason, c.stop_token_id) for c in out.choices)
            for c in out.choices:
                logprobs += [lp.logprob for lp in c.logprobs or ()]
            record.append((out.request_id, choices, out.finished, out.usage))
        steps.append(record)
    assert not engine.has_unfinished()
    return Run(steps, logprobs, engine)


def _per_request(run: Run) -> dict[str, list[tuple[Any, ...]]]:
    """Each request's outputs in order (step boundaries dropped)."""
    streams: dict[str, list[tuple[Any, ...]]] = {}
    for step in run.steps:
        for rid, choices, finished, usage in step:
            streams.setdefault(rid, []).append((choices, finished, usage))
    return streams


def _compare(model: Path, script: Script, same_steps: bool = True, **overrides: Any) -> tuple[Run, Run]:
    """Both modes on `script`. `same_steps`: also the same outputs in the same steps (not so when a
    request arrives mid-run: the step launched ahead delays its admission by one step)."""
    sync = _drive(_engine(model, "off", **overrides), script)
    overlap = _drive(_engine(model, "on", **overrides), script)
    assert not sync.engine.async_scheduling and overlap.engine.async_scheduling
    assert sync.engine.num_continuations == 0
    assert _per_request(overlap) == _per_request(sync)
    if same_steps:
        assert overlap.steps == sync.steps
        assert overlap.logprobs == pytest.approx(sync.logprobs, abs=1e-5)
    else:
        assert sorted(overlap.logprobs) == pytest.approx(sorted(sync.logprobs), abs=1e-5)
    for run in (sync, overlap):
        assert run.engine.block_manager.num_used_blocks == 0
        assert run.engine._launched is None
    assert overlap.engine.block_manager.num_free_blocks == sync.engine.block_manager.num_free_blocks
    return sync, overlap


def _tokens(run: Run, request_id: str) -> list[int]:
    return [
        t
        for step in run.steps
        for rid, choices, _, _ in step
        if rid == request_id
        for c in choices
        for t in c[1]
    ]


def _first_step(run: Run, request_id: str) -> int:
    return next(i for i, step in enumerate(run.steps) if any(rid == request_id for rid, *_ in step))


def _reference_run(model: Path, prompt: tuple[int, ...], params: SamplingParams) -> list[int]:
    return _engine(model, "off").generate([list(prompt)], params)[0].token_ids[0]


@pytest.fixture(scope="module", params=["stories", "qwen2"])
def model(request: pytest.FixtureRequest, stories_dir: Path, tiny_model_dirs: dict[str, Path]) -> Path:
    return stories_dir if request.param == "stories" else tiny_model_dirs["qwen2"]


def test_mixed_batch_with_stops_and_late_arrivals(model: Path) -> None:
    """Greedy, seeded (top-p / top-k, logprobs), n = 2, min_tokens, a stop id met mid-run, a request
    arriving while the others decode (a prefill between continuations) and ragged max_tokens (the
    continuation gathers rows: sequences that finish by length drop out of it)."""
    prompt = (1, 303, 207, 280, 31)
    g = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True)
    greedy, reference = _reference_run(model, prompt, g), _reference_run(model, prompt, sampled)
    # A token first drawn at output position >= 6: stopping on it ends the request mid-run.
    stop = next(t for i, t in enumerate(reference) if i >= 6 and t not in reference[:i])
    script = Script(
        requests={
            0: [
                EngineRequest("greedy", prompt, g),
                EngineRequest("stop", prompt, replace(sampled, stop_token_ids=(stop,))),
                EngineRequest(
                    "seeded",
                    (1, 200, 300),
                    SamplingParams(
                        temperature=0.9, top_p=0.9, seed=11, max_tokens=19, ignore_eos=True, logprobs=2
                    ),
                ),
                EngineRequest("short", (1, 50, 60), SamplingParams(temperature=0.0, max_tokens=3)),
                EngineRequest(
                    "n2",
                    (1, 70, 80, 90),
                    SamplingParams(temperature=1.0, top_k=30, seed=5, n=2, max_tokens=17, ignore_eos=True),
                ),
                EngineRequest(
                    "min", (1, 9), SamplingParams(temperature=0.7, seed=2, min_tokens=8, max_tokens=21)
                ),
            ],
            9: [
                EngineRequest(
                    "late", (1, 77, 78), SamplingParams(temperature=0.5, seed=9, max_tokens=12, logprobs=0)
                )
            ],
        }
    )
    sync, overlap = _compare(model, script, same_steps=False)
    # "late" was admitted one step later: it arrived while the next step was already launched
    assert _first_step(overlap, "late") == _first_step(sync, "late") + 1
    assert _tokens(sync, "stop")[-1] == stop and len(_tokens(sync, "stop")) < 24
    assert _tokens(sync, "greedy") == greedy
    assert overlap.engine.num_continuations >= 15  # of 24 steps: not the prefills, nor where "late" waits
    assert overlap.engine.num_discarded_rows >= 1  # "stop" was computed once more, then dropped


def test_prompt_chunks_and_admissions_are_launched_ahead(model: Path) -> None:
    """With a 16-token budget, long prompts arrive while others decode: the step launched ahead
    carries the decodes (ids from the device), the next chunk of a prompt being prefilled and
    newly admitted prompts (ids from the host); every request's tokens equal the synchronous run's."""
    long_prompt = tuple([1] + [100 + i for i in range(39)])
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=15, ignore_eos=True)
    script = Script(
        requests={
            0: [EngineRequest("a", (1, 30, 40), greedy), EngineRequest("b", (1, 31, 41), seeded)],
            3: [EngineRequest("long1", long_prompt, greedy)],
            4: [EngineRequest("short", (1, 60, 61, 62), seeded)],
            6: [EngineRequest("long2", long_prompt[::-1], seeded)],
        }
    )
    sync = _drive(_engine(model, "off", max_num_batched_tokens=16), script)
    engine = _engine(model, "on", max_num_batched_tokens=16)
    plan = engine.scheduler.schedule_continuation
    kinds: set[str] = set()

    def recorded(prev: Any) -> Any:
        out = plan(prev)
        for item, row in zip(out.scheduled if out else [], out.prev_rows or [] if out else [], strict=True):
            if row < 0:
                kinds.add("chunk" if item.start > 0 else "admitted")
            assert item.num_new_tokens == 1 or row < 0
        if out is not None:
            assert out.num_batched_tokens <= 16
        return out

    engine.scheduler.schedule_continuation = recorded  # type: ignore[method-assign]
    overlap = _drive(engine, script)
    assert _per_request(overlap) == _per_request(sync)
    assert kinds == {"chunk", "admitted"}, kinds
    assert engine.block_manager.num_used_blocks == 0 and engine._launched is None


def test_a_long_prompt_alone_is_chunked_ahead(model: Path) -> None:
    """A prompt of 3 budgets with nothing else running: each chunk is launched while the previous
    one runs (a step that samples nothing: every input id comes from the host)."""
    prompt = tuple([1] + [200 + i for i in range(44)])
    script = Script(
        requests={0: [EngineRequest("long", prompt, SamplingParams(temperature=0.0, max_tokens=5))]}
    )
    _, overlap = _compare(model, script, max_num_batched_tokens=16)
    assert overlap.engine.num_continuations >= 2 + 4


def test_a_chunked_prompt_with_parked_choices_forks_them_at_its_end(model: Path) -> None:
    """n = 2 and a prompt of 3 budgets: the chunk that ends the prompt forks the parked choice, so
    it is never planned ahead (it once was: the choice then forked steps later, from the wrong
    position, and the engine never finished)."""
    prompt = tuple([1] + [200 + i for i in range(44)])
    sp = SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=6, ignore_eos=True)
    script = Script(requests={0: [EngineRequest("forked", prompt, sp)]})
    _compare(model, script, max_num_batched_tokens=16)


def test_aborts_between_steps(model: Path) -> None:
    """Aborted while its next step is already launched: that row is discarded; an abort of the
    last running request drops the launched step entirely."""
    p = SamplingParams(temperature=0.8, seed=1, max_tokens=30, ignore_eos=True)
    script = Script(
        requests={0: [EngineRequest(f"r{i}", (1, 10 + i, 20 + i), p) for i in range(3)]},
        aborts={5: ["r1"], 12: ["r0", "missing"], 20: ["r2"]},
    )
    _, overlap = _compare(model, script)
    assert overlap.engine.num_discarded_rows >= 3
    finished = [choices for step in overlap.steps for rid, choices, done, _ in step if done]
    assert [c[0][2] for c in finished] == ["abort", "abort", "abort"]


def test_preemption(stories_dir: Path) -> None:
    """A KV cache of 12 blocks for 4 sequences of up to 5 blocks: recompute preemption. The
    continuation never preempts (it falls back), and it goes on while the preempted sequence
    waits for blocks that are not free: the same tokens per request, the re-admission possibly one
    step later than the synchronous engine makes it."""
    p = [
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=55, ignore_eos=True),
    ]
    script = Script(
        requests={0: [EngineRequest(f"r{i}", (1, 30 + i, 40, 50 + i), p[i % 2]) for i in range(4)]}
    )
    kv = f"{12 * STORIES_BLOCK_BYTES}"
    options: dict[str, Any] = dict(kv_cache_memory=kv, max_model_len=128, enable_prefix_caching=False)
    sync = _drive(_engine(stories_dir, "off", **options), script)
    engine = _engine(stories_dir, "on", **options)
    scheduler = engine.scheduler
    plan = scheduler.schedule_continuation
    beside_waiting = []

    def recorded(prev: Any) -> Any:
        out = plan(prev)
        if out is not None and scheduler.waiting:
            beside_waiting.append(len(scheduler.waiting))
        return out

    scheduler.schedule_continuation = recorded  # type: ignore[method-assign]
    overlap = _drive(engine, script)
    assert _per_request(overlap) == _per_request(sync)
    assert sync.engine.scheduler.num_preemptions > 0 and scheduler.num_preemptions > 0
    assert overlap.engine.num_continuations > 0
    assert beside_waiting, "no step was launched ahead while a preempted sequence waited"
    for run in (sync, overlap):
        assert run.engine.block_manager.num_used_blocks == 0 and run.engine._launched is None


def test_penalties_fall_back(stories_dir: Path) -> None:
    """Penalties need every output token on the host: no continuation while such a request runs."""
    script = Script(
        requests={
            0: [
                EngineRequest(
                    "pen",
                    (1, 5, 6),
                    SamplingParams(
                        temperature=0.0,
                        repetition_penalty=1.3,
                        frequency_penalty=0.5,
                        max_tokens=8,
                        ignore_eos=True,
                    ),
                ),
                EngineRequest(
                    "plain", (1, 7, 8), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
                ),
            ]
        }
    )
    _, overlap = _compare(stories_dir, script)
    # "pen" decodes 7 steps after its prefill (all synchronous); "plain" goes on alone, overlapped.
    assert 0 < overlap.engine.num_continuations <= 20 - 8


def test_option() -> None:
    assert parse_config(WorkerConfig, ["--model", "m"], "w").async_scheduling == "auto"
    assert (
        parse_config(WorkerConfig, ["--model", "m", "--async-scheduling", "on"], "w").async_scheduling == "on"
    )


def test_auto_is_off_on_cpu(stories_dir: Path) -> None:
    assert not _engine(stories_dir, "auto").async_scheduling


def test_deferred_sampler_path(stories_dir: Path) -> None:
    """The sampler's deferred path (tokens and logprobs left on the device, read through the step
    handle): overlap on equals overlap off, including a stop mid-run and ragged max_tokens."""

    def drive(mode: str) -> Run:
        engine = _engine(stories_dir, mode)
        p = [
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1),
            SamplingParams(temperature=0.9, seed=8, max_tokens=13, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=16),
        ]
        reqs = [EngineRequest(f"r{i}", (1, 40 + i, 41), p[i % 3]) for i in range(5)]
        return _drive(engine, Script(requests={0: reqs}, aborts={7: ["r3"]}))

    sync, overlap = drive("off"), drive("on")
    assert overlap.steps == sync.steps
    assert overlap.logprobs == pytest.approx(sync.logprobs, abs=1e-5)
    assert overlap.engine.num_continuations > 10 and overlap.engine.num_discarded_rows >= 1
