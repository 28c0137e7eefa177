"""Scheduler policy on the real engine: token budget, chunked prefill, decodes never starved, FCFS."""

from __future__ import annotations

from worker_testlib import RefModel, prompts_of_lengths

from services.worker.engine import Engine
from services.worker.request import EngineRequest, Request, SamplingParams
from services.worker.scheduler import SampledToken, SchedulerOutput


def step(engine: Engine) -> tuple[SchedulerOutput, set[str]]:
    """Engine.step, keeping the SchedulerOutput for inspection."""
    scheduled = engine.scheduler.schedule()
    sampled = engine.runner.execute(scheduled) if not scheduled.is_empty else []
    touched = engine.scheduler.update(scheduled, sampled)
    outputs = [engine._output(r) for r in touched]
    return scheduled, {o.request_id for o in outputs if o.choices}


def test_long_prompt_is_chunked_and_decodes_keep_going(ref_models: dict[str, RefModel]) -> None:
    engine = ref_models["stories"].engine(max_num_batched_tokens=16)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request(EngineRequest("short-a", (1, 403), sp))
    engine.add_request(EngineRequest("short-b", (1, 407, 261), sp))
    step(engine)  # both prompts in one step, first tokens sampled
    (long_prompt,) = prompts_of_lengths([100], 512, seed=1)
    engine.add_request(EngineRequest("long", tuple(long_prompt), sp))
    chunks = 0
    while engine.requests["long"].sequences[0].num_output_tokens == 0:
        scheduled, produced = step(engine)
        assert scheduled.num_batched_tokens <= 16
        assert {"short-a", "short-b"} <= produced  # every step still decodes the running requests
        long_items = [i for i in scheduled.scheduled if i.seq.request.request_id == "long"]
        assert len(long_items) == 1 and long_items[0].num_new_tokens <= 14
        chunks += 1
    assert chunks >= 100 // 14
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_waiting_requests_start_in_arrival_order(ref_models: dict[str, RefModel]) -> None:
    engine = ref_models["stories"].engine(max_num_batched_tokens=16, max_num_seqs=2)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([5, 5, 5, 5], 512, seed=2)):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), sp))
    first_step: dict[str, int] = {}
    n = 0
    while engine.has_unfinished():
        scheduled, _ = step(engine)
        assert len(scheduled.scheduled) <= 2  # --max-num-seqs
        for item in scheduled.scheduled:
            first_step.setdefault(item.seq.request.request_id, n)
        n += 1
    assert [first_step[f"r{i}"] for i in range(4)] == sorted(first_step[f"r{i}"] for i in range(4))
    assert first_step["r2"] > first_step["r1"]


def _decode_in_flight(ref_models: dict[str, RefModel], max_num_seqs: int) -> tuple[Engine, SchedulerOutput]:
    """r0, r1 prefilled and a decode step of theirs scheduled (in flight, not applied); r2 waits."""
    engine = ref_models["stories"].engine(max_num_batched_tokens=64, max_num_seqs=2)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([5, 5, 7], 512, seed=3)):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), sp))
    step(engine)
    prev = engine.scheduler.schedule()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
    engine.scheduler.max_num_seqs = max_num_seqs
    return engine, prev


def test_continuation_beside_waiting_requests(ref_models: dict[str, RefModel]) -> None:
    """Async scheduling plans the next step ahead while requests wait: decodes whose input ids are
    the in-flight step's tokens (prev_rows), as long as `schedule()` would admit nothing (no free
    slot). Where it would, the continuation admits the same (a prompt chunk, ids from the host)."""
    engine, prev = _decode_in_flight(ref_models, max_num_seqs=2)
    nxt = engine.scheduler.schedule_continuation(prev)
    assert nxt is not None and [i.seq.request.request_id for i in nxt.scheduled] == ["r0", "r1"]
    assert nxt.prev_rows == [0, 1] and len(engine.scheduler.waiting) == 1

    engine, prev = _decode_in_flight(ref_models, max_num_seqs=3)
    nxt = engine.scheduler.schedule_continuation(prev)
    assert nxt is not None and [i.seq.request.request_id for i in nxt.scheduled] == ["r0", "r1", "r2"]
    assert nxt.prev_rows == [0, 1, -1] and not engine.scheduler.waiting
    r2 = nxt.scheduled[2]
    assert (r2.start, r2.num_new_tokens, r2.sample, r2.pending_tokens) == (0, 7, True, 0)
    assert [(i.start, i.num_new_tokens, i.pending_tokens) for i in nxt.scheduled[:2]] == [(6, 1, 1)] * 2
    assert nxt.num_batched_tokens == 9


def test_small_request_is_not_starved_by_a_many_prompt_request(ref_models: dict[str, RefModel]) -> None:
    """A gateway request of 40 prompts x n=4 (one group) fills every sequence slot; a one-prompt
    request arriving behind it starts within two steps instead of after all 40 prompts."""
    engine = ref_models["stories"].engine(max_num_batched_tokens=64, max_num_seqs=16)
    big = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True, n=4)
    for i, prompt in enumerate(prompts_of_lengths([6] * 40, 512, seed=4)):
        engine.add_request(EngineRequest(f"big-{i}", tuple(prompt), big, group_id="big"))
    for _ in range(6):
        step(engine)
    assert len(engine.scheduler.running) == 16  # the big request holds every slot
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request(EngineRequest("small", (1, 403, 261), sp, group_id="small"))
    steps = 0
    while engine.requests["small"].sequences[0].num_output_tokens == 0:
        step(engine)
        steps += 1
        assert steps <= 2, "the small request waited behind the big one"
    # The big request's prompts still all complete (preempted ones are recomputed).
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_groups_take_turns_at_admission(ref_models: dict[str, RefModel]) -> None:
    """Two groups' waiting prompts are admitted alternately (fewest running first), not group by
    group in arrival order."""
    engine = ref_models["stories"].engine(max_num_batched_tokens=64, max_num_seqs=4)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompts = prompts_of_lengths([5] * 8, 512, seed=5)
    for i in range(4):
        engine.add_request(EngineRequest(f"a{i}", tuple(prompts[i]), sp, group_id="a"))
    for i in range(4):
        engine.add_request(EngineRequest(f"b{i}", tuple(prompts[4 + i]), sp, group_id="b"))
    scheduled, _ = step(engine)
    assert sorted(item.seq.request.request_id for item in scheduled.scheduled) == ["a0", "a1", "b0", "b1"]
    while engine.has_unfinished():
        engine.step()


def test_batches_in_flight_never_share_or_preempt_each_others_requests(
    ref_models: dict[str, RefModel],
) -> None:
    """A pipeline-parallel group's batches in flight (engine.py `_step_pipelined`): each batch is
    scheduled with the requests of the batch in flight `busy`, which it neither schedules nor
    preempts, and at most `max_requests` requests, so two batches share the four requests; a
    10-block cache preempts the requests of the batch being scheduled only."""
    engine = ref_models["stories"].engine(
        max_num_batched_tokens=64, kv_cache_memory="200KiB", max_model_len=128
    )
    assert engine.block_manager.num_blocks == 10
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([30, 30, 30, 30], 512, seed=4)):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), sp))
    scheduler = engine.scheduler
    Started = tuple[SchedulerOutput, list[list[SampledToken]]]

    def requests_of(out: SchedulerOutput | None) -> set[Request]:
        return {item.seq.request for item in out.scheduled} if out is not None else set()

    def start(in_flight: SchedulerOutput | None) -> Started:
        busy = requests_of(in_flight)
        running = [s for s in scheduler.running if s.request in busy]
        out = scheduler.schedule(busy, max_requests=2)
        assert not requests_of(out) & busy
        assert all(s in scheduler.running for s in running)  # none of the batch in flight preempted
        return out, engine.runner.execute(out) if not out.is_empty else []

    first = start(None)
    second = start(first[0])
    names = [{r.request_id for r in requests_of(batch[0])} for batch in (first, second)]
    assert names == [{"r0", "r1"}, {"r2", "r3"}]
    in_flight: list[Started] = [first, second]
    while in_flight:
        out, sampled = in_flight.pop(0)  # the oldest batch is back: its tokens are applied
        for request in scheduler.update(out, sampled):
            engine._output(request)
        following = start(in_flight[0][0] if in_flight else None)
        if not following[0].is_empty:
            in_flight.append(following)
    assert scheduler.num_preemptions > 0
    assert not engine.has_unfinished() and engine.block_manager.num_used_blocks == 0
