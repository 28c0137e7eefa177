"""Beam search against independent sampling of the same run: tokens/s per beam.

For each model shape (dummy weights) and width W in (4, 8): the same prompts run with beam
search of W beams and with n = W independently sampled choices (--runs times each,
alternating; the median), every sequence to
max_tokens (ignore_eos, so both generate the same number of tokens). The figure is tokens/s per
beam (or choice): beam search's extra work is the per-step top-K over beams x vocab, the forks
(block-table copies and one partial KV block per extra child) and one host merge per step. Target
(issue 21): beam search at >= 80% of sampling's tokens/s per sequence.

    python benchmarks/beam_bench.py [--models Qwen2-0.5B,Llama-3.1-8B] [--out benchmarks/results/beam_<gpu>.json]
    python benchmarks/beam_bench.py --smoke     # CPU, a tiny Llama: checks the script in seconds
    python benchmarks/beam_bench.py --phases    # also: where a step's wall time goes, per mode
    python benchmarks/beam_bench.py --async-scheduling off   # both modes synchronous
    python benchmarks/beam_bench.py --host --phases   # CPU proxy of the host work (below)
    python benchmarks/beam_bench.py --host --profile  # ... and where its Python goes (cProfile)

`--host` is the CPU proxy of a step's host work: 8 prompts, W = 4 and 8 (32 / 64 sequences),
steps launched ahead (async scheduling on), a Llama so small (1 layer, hidden 32, vocabulary 256)
that its forward is a small part of the step, so what a beam step costs beyond a sampling step
is the Python and torch dispatch around it. Its `--phases` are the engine thread's CPU time
(torch on one thread), which other processes on a loaded machine do not inflate. `--profile` prints each mode's top functions by
own time.

Beam selection runs on the device (beam_select.py) and, with async scheduling (on by default on
CUDA), each beam step is launched before the host reads the one before, as sampling's steps are
(docs/beam_search.md): `ahead` in the table is the share of beam tokens whose step was launched
that way (all but each request's first two steps and its last). `--phases` shows where a step's wall time goes: per
step, the host time of schedule, launch (input preparation and enqueueing; on the CPU it
includes the forward), the wait for the step's results (device time not hidden), and apply
(scheduler update, the beam step, outputs).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import MODELS, write_model

from services.common.sampling import SamplingParams
from services.worker import beam_select
from services.worker.async_step import StepHandle
from services.worker.config import WorkerConfig
from services.worker.engine import Engine

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# --host: a forward that costs little next to the step's host work
HOST = {
    **TINY,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 256,
}


@dataclass
class Row:
    model: str
    width: int
    mode: str  # "beam" | "sample"
    prompts: int
    prompt_len: int
    max_tokens: int
    seconds: float
    tokens: int  # generated over every beam / choice
    tok_per_s_per_seq: float
    ratio_to_sampling: float | None = None
    ahead: float | None = None  # beam rows launched before the step before them was read
    phases_us_per_step: dict[str, float] = field(default_factory=dict)  # --phases
    runs: list[float] = field(default_factory=list)  # each timed run's seconds (`seconds`: their median)


@contextmanager
def phase_timers(
    engine: Engine, clock: Callable[[], float] = time.perf_counter
) -> Iterator[defaultdict[str, float]]:
    """Seconds spent in each phase of the engine's steps (and the number of steps), while inside.
    `clock`: wall time, or (--host) the thread's CPU time, which other processes on a loaded
    machine do not inflate."""
    spent: defaultdict[str, float] = defaultdict(float)

    def timed(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += clock() - start

        return wrapper

    result = StepHandle.result
    runner, scheduler = engine.runner, engine.scheduler
    engine.step = timed(engine.step, "step")  # type: ignore[method-assign]
    scheduler.schedule = timed(scheduler.schedule, "schedule")  # type: ignore[method-assign]
    scheduler.schedule_continuation = timed(scheduler.schedule_continuation, "schedule")  # type: ignore[method-assign]
    scheduler.update = timed(scheduler.update, "update")  # type: ignore[method-assign]
    engine._launch = timed(engine._launch, "launch")  # type: ignore[method-assign]
    engine._apply = timed(engine._apply, "apply")  # type: ignore[method-assign]
    # the model's forward (on the CPU, the whole forward; on a GPU, its launches)
    runner._forward_eager = timed(runner._forward_eager, "forward")  # type: ignore[method-assign]
    runner._step_inputs = timed(runner._step_inputs, "inputs")  # type: ignore[method-assign]
    runner.beams.select = timed(runner.beams.select, "select")  # type: ignore[method-assign]
    runner.beams.ahead = timed(runner.beams.ahead, "ahead")  # type: ignore[method-assign]
    StepHandle.result = timed(result, "wait+read")  # type: ignore[method-assign]
    # the selection's pass over the vocabulary (top-2K per beam row and its ordering): on a GPU
    # device work, on the CPU part of `select`
    topk = beam_select.ordered_topk
    beam_select.ordered_topk = timed(topk, "topk")  # type: ignore[assignment]
    try:
        yield spent
    finally:
        StepHandle.result = result  # type: ignore[method-assign]
        beam_select.ordered_topk = topk  # type: ignore[assignment]
        for obj, names in (
            (engine, ("step", "_launch", "_apply")),
            (scheduler, ("schedule", "schedule_continuation", "update")),
            (runner, ("_forward_eager", "_step_inputs")),
            (runner.beams, ("select", "ahead")),
        ):
            for name in names:
                delattr(obj, name)
        # host: the step's wall time but the model's forward (what a beam step adds is in here)
        spent["host"] = spent["step"] - spent["forward"]
        spent["host-topk"] = spent["host"] - spent["topk"]


def count_steps(engine: Engine) -> Callable[[], int]:
    """Counts the engine's steps from now on (returns the count so far)."""
    steps = [0]
    step = engine.step

    def counted() -> Any:
        steps[0] += 1
        return step()

    engine.step = counted  # type: ignore[method-assign]
    return lambda: steps[0]


def run_once(engine: Engine, prompts: list[list[int]], sp: SamplingParams[Any]) -> tuple[float, int]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(prompts, sp)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # beam search returns n of its W beams: count the W beams' tokens (all ran to max_tokens)
    tokens = len(prompts) * sp.num_sequences * (sp.max_tokens or 0)
    assert all(len(r.token_ids) == sp.n for r in results)
    return elapsed, tokens


def bench_model(name: str, model_dir: Path, args: argparse.Namespace, device: str) -> list[Row]:
    engine = Engine(
        WorkerConfig(
            model=str(model_dir),
            load_format="dummy",
            device=device,
            max_num_seqs=max(args.widths) * args.prompts,
            max_model_len=args.prompt_len + args.max_tokens + 8,
            enable_prefix_caching=False,  # the sampling run must not reuse the beam run's prompt KV
            async_scheduling=args.async_scheduling,
        )
    )
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    prompts = [
        torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)
    ]
    rows: list[Row] = []
    for width in args.widths:
        common: dict[str, Any] = {"max_tokens": args.max_tokens, "ignore_eos": True}
        beam = SamplingParams(temperature=0.0, n=width, use_beam_search=True, **common)
        sample = SamplingParams(temperature=1.0, n=width, seed=1, **common)
        for sp in (beam, sample):  # warm-up (CUDA graphs, Triton autotuning), at the measured batch
            run_once(engine, prompts, SamplingParams(**{**asdict_sp(sp), "max_tokens": 4}))
        # --runs timed runs of each mode, beam and sampling alternating (a drift of the machine
        # reaches both), the median of each; "ahead" over all of beam's runs
        timed: dict[str, list[float]] = {"beam": [], "sample": []}
        tokens_of: dict[str, int] = {}
        ahead_rows = 0
        for _ in range(args.runs):
            for mode, sp in (("beam", beam), ("sample", sample)):
                ahead_before = engine.scheduler.num_beam_steps_ahead
                seconds, tokens_of[mode] = run_once(engine, prompts, sp)
                timed[mode].append(seconds)
                ahead_rows += engine.scheduler.num_beam_steps_ahead - ahead_before
        measured = {}
        for mode, sp in (("beam", beam), ("sample", sample)):
            seconds, tokens = statistics.median(timed[mode]), tokens_of[mode]
            measured[mode] = Row(
                name,
                width,
                mode,
                args.prompts,
                args.prompt_len,
                args.max_tokens,
                seconds,
                tokens,
                tokens / seconds / (args.prompts * width),
                ahead=ahead_rows / (tokens * args.runs) if mode == "beam" else None,
                runs=[round(t, 4) for t in timed[mode]],
            )
            if args.phases:  # more runs, timed by phase (the timers cost a little: not the figure)
                best: dict[str, float] = {}
                for _ in range(args.repeat):  # each phase's best run (a loaded machine's noise)
                    with phase_timers(engine, time.thread_time if args.host else time.perf_counter) as spent:
                        num_steps = count_steps(engine)
                        run_once(engine, prompts, sp)
                        steps = max(num_steps(), 1)
                    for k, v in spent.items():
                        best[k] = min(best.get(k, float("inf")), v / steps * 1e6)
                measured[mode].phases_us_per_step = best
            if args.profile:
                profile_run(engine, prompts, sp, f"{name} W={width} {mode}")
        measured["beam"].ratio_to_sampling = (
            measured["beam"].tok_per_s_per_seq / measured["sample"].tok_per_s_per_seq
        )
        rows += [measured["beam"], measured["sample"]]
    del engine
    gc.collect()  # the next shape's engine sizes its KV cache from the memory left
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_run(engine: Engine, prompts: list[list[int]], sp: SamplingParams[Any], title: str) -> None:
    """One more run under cProfile: the top functions by own time, in us per engine step."""
    num_steps = count_steps(engine)
    profiler = cProfile.Profile()
    profiler.enable()
    run_once(engine, prompts, sp)
    profiler.disable()
    steps = max(num_steps(), 1)
    del engine.step
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    print(f"\n== cProfile: {title}, {steps} steps (times are totals: divide by {steps} per step) ==")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:12000])


def asdict_sp(sp: SamplingParams[Any]) -> dict[str, Any]:
    return {f: getattr(sp, f) for f in sp.__dataclass_fields__}


def print_table(rows: list[Row], device_name: str) -> None:
    print(f"\n== beam search vs independent sampling on {device_name} ==")
    print(
        f"{'model':<14} {'W':>2} {'mode':<7} {'s':>8} {'tok/s/seq':>10} {'ahead':>6} {'beam/sample':>12}"
        "  target >= 0.80"
    )
    for r in rows:
        ratio = "" if r.ratio_to_sampling is None else f"{r.ratio_to_sampling:.2f}"
        met = "" if r.ratio_to_sampling is None else ("yes" if r.ratio_to_sampling >= 0.8 else "NO")
        ahead = "" if r.ahead is None else f"{r.ahead:.2f}"
        print(
            f"{r.model:<14} {r.width:>2} {r.mode:<7} {r.seconds:>8.3f} {r.tok_per_s_per_seq:>10.1f} {ahead:>6}"
            f" {ratio:>12}  {met}"
        )
    if any(r.phases_us_per_step for r in rows):
        names: tuple[str, ...] = ("step", "forward", "host", "host-topk", "schedule", "launch", "inputs")
        names += ("select", "topk", "ahead", "wait+read", "apply", "update")
        print(
            "\nper step, us (launch: input preparation and enqueueing, forward included; wait+read:"
            " device time not hidden; host: step but forward; topk: the selection's pass over the"
            " vocabulary, in select; beam/sample: beam's host and host-topk over sampling's host)"
        )
        print(f"{'model':<14} {'W':>2} {'mode':<7} " + " ".join(f"{n:>9}" for n in names) + "  beam/sample")
        sampled = {(r.model, r.width): r.phases_us_per_step for r in rows if r.mode == "sample"}
        for r in rows:
            phases = r.phases_us_per_step
            cells = " ".join(f"{phases.get(n, 0.0):>9.0f}" for n in names)
            base = sampled.get((r.model, r.width), {}).get("host", 0.0)
            ratio = ""
            if r.mode == "beam" and base:
                ratio = f"{phases.get('host', 0.0) / base:.2f} {phases.get('host-topk', 0.0) / base:.2f}"
            print(f"{r.model:<14} {r.width:>2} {r.mode:<7} {cells}  {ratio:>11}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, a tiny Llama: checks the script in seconds"
    )
    parser.add_argument("--models", default="Qwen2-0.5B,Llama-3.1-8B")
    parser.add_argument("--widths", default="4,8")
    parser.add_argument("--prompts", type=int, default=8, help="prompts run together")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--host",
        action="store_true",
        help="CPU proxy of the host work: 8 prompts, W = 4 / 8, steps ahead, a minuscule Llama",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=0,
        help="timed runs per mode, beam and sampling alternating; the median (default: 5 on CUDA, 1 on the CPU)",
    )
    parser.add_argument("--profile", action="store_true", help="one more run per mode under cProfile")
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="--phases: runs per mode, each phase's best (default 1; --host: 5)",
    )
    parser.add_argument(
        "--phases", action="store_true", help="one more run per mode timed by phase: where a step's time goes"
    )
    parser.add_argument(
        "--async-scheduling",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto: on with CUDA; off: every step (beam or not) synchronous, for comparison",
    )
    parser.add_argument(
        "--out",
        default="",
        help="JSON path (default benchmarks/results/beam_<device>.json; with --smoke, the temp dir)",
    )
    args = parser.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    args.repeat = args.repeat or (0 if args.host else 1)
    if args.smoke:
        device, shapes = "cpu", {"tiny-llama": TINY}
        args.prompts, args.prompt_len, args.max_tokens = 2, 12, 8
    elif args.host:
        device, shapes = "cpu", {"host-llama": HOST}
        args.prompts, args.prompt_len, args.max_tokens = 8, 16, 48
        args.async_scheduling = "on"
        args.repeat = args.repeat or 5
        torch.set_num_threads(1)  # the host's own work, on the engine thread (timed by its CPU time)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        shapes = {name: MODELS[name] for name in args.models.split(",")}
    args.runs = args.runs or (5 if device == "cuda" else 1)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in shapes.items():
            rows += bench_model(name, write_model(Path(tmp), name, cfg), args, device)
    print_table(rows, device_name)
    slug = device_name.lower().replace(" ", "-")
    # a smoke run's figures are no record: kept out of benchmarks/results unless --out says so
    results = Path(tempfile.gettempdir()) if args.smoke else Path(__file__).parent / "results"
    out = Path(args.out or results / f"beam_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": device_name,
        "args": {k: v for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
