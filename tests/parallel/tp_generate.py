"""Run one tensor-parallel worker group's engine (rank 0 here, ranks 1..T-1 spawned as
`tandem worker` does) over a batch of prompts and write the results as JSON.

    python tests/parallel/tp_generate.py OUT.json PROMPTS.json -- <tandem worker options>

PROMPTS.json: {"prompts": [[ids]], "max_tokens": n, "logprobs": k, "n": n, "lora_names": [name],
"ignore_eos": bool}
("lora_names": each prompt's LoRA adapter, "" for the base model; optional; "guided": each
prompt's [kind, value] GuidedSpec or null, optional; "aborts": {"after_step": k, "indices": [i]}:
those requests aborted after the engine's k-th step, optional; "rounds": [[[ids]]]
instead of "prompts": each round's prompts together, one round after the other; "round_params":
[{SamplingParams field: value}] for each round, optional); with --task embed
only the prompts count, and the output holds their embeddings. With --speculative the output
also holds the speculator's counters ("spec") and every proposal it made ("proposals"). The same code path
as `tandem worker --tensor-parallel-size T` (tp_launch.start_group, Engine with its StepDriver)
without gRPC, so the tests can compare tokens and logprobs exactly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.worker.engine import Engine


def main(argv: list[str]) -> int:
    out_path, prompts_path, sep, *worker_argv = argv
    assert sep == "--"
    from services.common.config import parse_config
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine, GenerateResult, collect
    from services.worker.request import EngineRequest, SamplingParams
    from services.worker.tp_launch import start_group
    from tests.parallel.forkserver import fork_ranks

    fork_ranks()  # the group's other ranks as forks of this process (tests/parallel/forkserver.py)
    torch.set_num_threads(1)
    spec = json.loads(Path(prompts_path).read_text())
    config = parse_config(WorkerConfig, worker_argv, "tp_generate")
    group = start_group(config, worker_argv).local if config.world_size > 1 else None
    try:
        engine = Engine(config)
        if config.task == "embed":  # pooling mode: the embeddings instead of tokens
            vectors = engine.embed(spec["prompts"])
            out = {
                "embeddings": [list(v) for v in vectors],
                "used_blocks": engine.block_manager.num_used_blocks,
            }
            Path(out_path).write_text(json.dumps(out))
            return 0
        proposals = record_proposals(engine)
        batches = watch_batches(engine)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=spec["max_tokens"],
            logprobs=spec.get("logprobs"),
            n=spec.get("n", 1),
            ignore_eos=spec.get("ignore_eos", False),
        )
        if "lora_names" in spec:  # each prompt under its adapter, all in flight together
            requests = [
                EngineRequest(f"gen-{i}", tuple(prompt), params, lora_name=name)
                for i, (prompt, name) in enumerate(zip(spec["prompts"], spec["lora_names"], strict=True))
            ]
            by_id = {r.request_id: GenerateResult(r.request_id) for r in requests}
            for r in requests:
                engine.add_request(r)
            while engine.has_unfinished():
                for step_out in engine.step():
                    collect(by_id[step_out.request_id], step_out)
            results = list(by_id.values())
        elif "guided" in spec or "aborts" in spec:
            results = run_with_aborts(engine, spec, params)
        elif "rounds" in spec:  # each round runs to completion before the next one starts
            results = []
            overrides = spec.get("round_params") or [{}] * len(spec["rounds"])
            for k, (prompts, over) in enumerate(zip(spec["rounds"], overrides, strict=True)):
                results += engine.generate(prompts, replace(params, **over), prefix=f"round{k}")
        else:
            results = engine.generate(spec["prompts"], params)
        Path(out_path).write_text(
            json.dumps(
                {
                    "tokens": [{str(k): v for k, v in r.token_ids.items()} for r in results],
                    "logprobs": [[lp.logprob for lp in r.logprobs.get(0, [])] for r in results],
                    "top": [[list(map(list, lp.top)) for lp in r.logprobs.get(0, [])] for r in results],
                    "used_blocks": engine.block_manager.num_used_blocks,
                    "num_kv_heads": int(engine.kv_cache.tensor.shape[4]),
                    "norms_folded": bool(engine.runner.model.norms_folded),
                    # rank 0's decode CUDA-graph ladder ([] = eager; every rank captured the same)
                    "graph_sizes": engine.runner.graphs.batch_sizes if engine.runner.graphs else [],
                    "graph_replays": engine.runner.graphs.num_replays if engine.runner.graphs else 0,
                    "num_preemptions": engine.scheduler.num_preemptions,
                    "cached_tokens": [r.usage.cached_prompt_tokens if r.usage else None for r in results],
                    "host_tier": host_tier_counters(engine),
                    "spec": _spec_stats(engine),
                    "proposals": proposals,
                    "batches": batches,
                    "finish_reasons": [{str(k): v for k, v in r.finish_reasons.items()} for r in results],
                    "discarded_rows": engine.num_discarded_rows,
                }
            )
        )
    finally:
        if group is not None:
            group.terminate()
    return 0


def run_with_aborts(engine: Engine, spec: dict[str, Any], params: Any) -> list[Any]:
    """Every prompt in flight at once (each with its guided constraint, if any); the requests of
    `spec["aborts"]["indices"]` aborted after step `spec["aborts"]["after_step"]`."""
    from services.worker.engine import GenerateResult, collect
    from services.worker.guided import GuidedSpec
    from services.worker.request import EngineRequest

    guided = spec.get("guided") or [None] * len(spec["prompts"])
    requests = [
        EngineRequest(
            f"gen-{i}",
            tuple(prompt),
            replace(params, guided=GuidedSpec(*g)) if g is not None else params,
        )
        for i, (prompt, g) in enumerate(zip(spec["prompts"], guided, strict=True))
    ]
    by_id = {r.request_id: GenerateResult(r.request_id) for r in requests}
    for r in requests:
        engine.add_request(r)
    aborts = spec.get("aborts") or {"after_step": -1, "indices": []}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            collect(by_id[out.request_id], out)
        steps += 1
        if steps == aborts["after_step"]:
            for i in aborts["indices"]:
                out = engine.abort(f"gen-{i}")
                if out is not None:
                    collect(by_id[out.request_id], out)
    return list(by_id.values())


def watch_batches(engine: Engine) -> dict[str, int]:
    """Counts of a pipeline-parallel group's batches in flight (--pipeline-batches): batches
    started, the most in flight at once, and batches that shared a sequence with one in flight
    (never, by design)."""
    stats = {"started": 0, "max_in_flight": 0, "shared": 0}
    launch = engine.runner.launch_in_flight

    def watched(out: Any) -> Any:
        flying = {id(item.seq) for batch in engine.in_flight for item in batch.scheduled}
        stats["shared"] += any(id(item.seq) in flying for item in out.scheduled)
        stats["started"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], len(engine.in_flight) + 1)
        return launch(out)

    engine.runner.launch_in_flight = watched  # type: ignore[method-assign]
    return stats


def host_tier_counters(engine: Engine) -> dict[str, int] | None:
    """Rank 0's host KV tier (--kv-offload-memory) counters, None without the tier."""
    tier, bm = engine.kv_offload, engine.block_manager
    if tier is None:
        return None
    return {
        "saved": tier.num_saved,
        "loaded": tier.num_loaded,
        "held": tier.num_held,
        "host_hit_tokens": bm.num_host_hit_tokens,
        "swapped_out": bm.num_swapped_out,
        "swapped_in": bm.num_swapped_in,
    }


def record_proposals(engine: Any) -> list[list[list[int] | None]]:
    """The list every proposal of the engine's speculator (the drafts of each call, None where a
    sequence got none) is appended to: two engines that see the same features propose the same."""
    calls: list[list[list[int] | None]] = []
    if engine.speculator is None:
        return calls
    proposer = engine.speculator.proposer
    propose = proposer.propose

    def recorded(seqs: list[Any], k: int) -> list[Any]:
        drafts = propose(seqs, k)
        calls.append([d.token_ids if d is not None else None for d in drafts])
        return drafts

    proposer.propose = recorded
    return calls


def _spec_stats(engine: Any) -> dict[str, float] | None:
    """The speculator's counters, and the blocks its draft model / EAGLE head still holds."""
    speculator = engine.speculator
    if speculator is None:
        return None
    stats = speculator.stats
    return {
        "num_drafts": stats.num_drafts,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "num_emitted_tokens": stats.num_emitted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "draft_used_blocks": getattr(speculator.proposer, "num_used_blocks", 0),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
