"""Speculative decoding in tensor- and pipeline-parallel groups on the CPU (gloo): prompt lookup,
a draft model and EAGLE-1 / EAGLE-3 heads in T = 2 (and T = 2 x P = 2) groups give the greedy
tokens of T = 1 without speculation and of transformers (logprobs within 1e-4), with 8 requests in
flight and chunked prefill (the draft model at T = 2 with preemption too); every KV block (the
target's on every rank, the draft's or head's on rank 0) is back at the end; and every proposal
equals the one the same speculation makes at T = 1: the draft model and the heads are whole on
rank 0 (the EAGLE heads have one attention head, which does not split over 2 ranks) and the heads
read whole features.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.config import WorkerConfig
from services.worker.engine import Engine, GenerateResult
from services.worker.request import SamplingParams
from tests.parallel.conftest import GroupRun, _llama
from tests.parallel.tp_generate import record_proposals
from tests.worker.eagle_testlib import head_config, random_head_tensors, write_head
from tests.worker.worker_testlib import RefModel, load_ref, prompts_of_lengths

LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5]  # 8 requests in flight; the long ones are chunked (budget 16)
MAX_TOKENS = 16
K = 3

# (name, proposer: prompt-lookup, draft or an EAGLE head, T, P); each runs as one group
CONFIGS: list[tuple[str, str, int, int]] = [
    ("prompt-lookup", "prompt-lookup", 2, 1),
    ("prompt-lookup", "prompt-lookup", 2, 2),
    # a KV pool of 9 blocks on rank 0 (its half of the target's KV heads and the draft's whole ones,
    # 12288 bytes a block): sequences are preempted (recomputed), their draft state dropped
    ("draft-model-preempted", "draft", 2, 1),
    ("draft-model", "draft", 2, 2),
    ("eagle", "eagle", 2, 1),
    ("eagle3", "eagle3", 2, 1),
    ("eagle", "eagle", 2, 2),  # EAGLE-1 reads the final hidden states, which come back to stage 0
]
SLOW = {"eagle-t2p2"}  # (covered by EAGLE-1 at T = 2 and the draft model at T = 2 x P = 2)
PREEMPTING = {"kv_cache_memory": str(9 * 12288), "max_model_len": 128}


def _draft_dir(path: Path, target: Path) -> Path:
    """The target with noise on its weights: a draft that agrees often, not always."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std() * 0.1)
    model.save_pretrained(str(path))
    return path


def _head_dir(path: Path, target: Path, eagle3: bool) -> Path:
    """A random EAGLE-1 / EAGLE-3 head for the target, with one attention head (EAGLE-3: over the
    target's layers 0 and 1, a draft vocabulary of 200 tokens)."""
    extra: dict[str, Any] = {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64}
    if eagle3:
        extra |= {"draft_vocab_size": 200, "eagle_aux_hidden_state_layer_ids": [0, 1]}
    cfg = head_config(target, eagle3, **extra)
    return write_head(path, cfg, random_head_tensors(cfg, eagle3, seed=3, num_aux=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("spec-tp-target")
    # GQA (2 KV heads, one per rank), a vocabulary that does not split evenly
    _llama(vocab_size=321).save_pretrained(str(target), max_shard_size="100KB")
    return {
        "target": target,
        "draft": _draft_dir(tmp_path_factory.mktemp("spec-tp-draft"), target),
        "eagle": _head_dir(tmp_path_factory.mktemp("spec-tp-eagle"), target, eagle3=False),
        "eagle3": _head_dir(tmp_path_factory.mktemp("spec-tp-eagle3"), target, eagle3=True),
    }


def _spec_options(models: dict[str, Path], kind: str) -> dict[str, Any]:
    options: dict[str, Any] = {"num_speculative_tokens": K, "speculative_adaptive": False}
    if kind == "prompt-lookup":
        return options | {"speculative": "prompt-lookup"}
    if kind == "draft":
        return options | {"speculative": "draft-model", "speculative_model": str(models["draft"])}
    return options | {"speculative": "eagle", "speculative_model": str(models[kind])}


def _argv(options: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag if value is not False else f"--no-{key.replace('_', '-')}"]
        if not isinstance(value, bool):
            argv.append(str(value))
    return argv


def _key(config: tuple[str, str, int, int]) -> str:
    name, _, tp, pp = config
    return f"{name}-t{tp}p{pp}"


PROMPTS = prompts_of_lengths(LENGTHS, 321, seed=3)
COMMON = {"device": "cpu", "kv_cache_memory": "4MiB", "max_num_batched_tokens": 16, "cpu_threads": 1}


class Groups:
    """The configurations' groups, at most RUNNING at once (each is 2 or 4 processes), started in
    CONFIGS' order (the order the tests ask for their results); only those of the session's
    selected tests."""

    RUNNING = 3

    def __init__(
        self, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, wanted: list[str]
    ) -> None:
        self.models, self.tmp = models, tmp_path_factory
        self.pending = {key: c for key, c in ((_key(c), c) for c in CONFIGS) if key in wanted}
        self.runs: dict[str, GroupRun] = {}
        for key in list(self.pending)[: self.RUNNING]:
            self._start(key)

    def _start(self, key: str) -> None:
        _, kind, tp, pp = self.pending.pop(key)
        options = {"model": str(self.models["target"]), **COMMON, **_spec_options(self.models, kind)}
        options |= {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}
        if key.startswith("draft-model-preempted"):
            options |= PREEMPTING
        self.runs[key] = GroupRun(
            self.tmp.mktemp(f"spec-{key}"),
            {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "logprobs": 2},
            *_argv(options),
            timeout_s=300,
        )

    def result(self, key: str) -> dict[str, Any]:
        if key not in self.runs:  # (asked out of order)
            self._start(key)
        try:
            return self.runs[key].result()
        finally:
            if self.pending:
                self._start(next(iter(self.pending)))

    def close(self) -> None:
        for run in self.runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


@pytest.fixture(scope="module")
def groups(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Groups]:
    selected = [
        item.callspec.id
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_group_speculation_equals_t1_and_transformers"
    ]
    runs = Groups(models, tmp_path_factory, selected)
    try:
        yield runs
    finally:
        runs.close()


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> tuple[list[list[int]], list[GenerateResult]]:
    """Transformers' greedy tokens and T = 1 without speculation."""
    ref: RefModel = load_ref(models["target"])
    expected = [ref.greedy(p, MAX_TOKENS) for p in PROMPTS]
    engine = Engine(WorkerConfig(model=str(models["target"]), **COMMON))  # type: ignore[arg-type]
    plain = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2))
    return expected, plain


_SINGLE: dict[str, tuple[dict[str, int], list[Any]]] = {}


def _single_rank(models: dict[str, Path], kind: str) -> tuple[dict[str, int], list[Any]]:
    """The acceptance counters and the proposals of the same speculation at T = 1."""
    if kind not in _SINGLE:
        engine = Engine(WorkerConfig(model=str(models["target"]), **COMMON, **_spec_options(models, kind)))  # type: ignore[arg-type]
        proposals = record_proposals(engine)
        engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        assert engine.speculator is not None and engine.block_manager.num_used_blocks == 0
        s = engine.speculator.stats
        counters = {
            "num_drafts": s.num_drafts,
            "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens,
        }
        _SINGLE[kind] = counters, proposals
    return _SINGLE[kind]


@pytest.mark.parametrize(
    ("name", "kind", "tp", "pp"),
    [pytest.param(*c, id=_key(c), marks=[pytest.mark.slow] if _key(c) in SLOW else []) for c in CONFIGS],
)
def test_group_speculation_equals_t1_and_transformers(
    models: dict[str, Path],
    groups: Groups,
    reference: tuple[list[list[int]], list[GenerateResult]],
    name: str,
    kind: str,
    tp: int,
    pp: int,
) -> None:
    expected, plain = reference
    counters, proposals = _single_rank(models, kind)
    got = groups.result(_key((name, kind, tp, pp)))
    assert got["used_blocks"] == 0
    spec = got["spec"]
    assert spec["draft_used_blocks"] == 0
    for i, prompt in enumerate(PROMPTS):
        assert plain[i].token_ids[0] == expected[i]
        assert got["tokens"][i]["0"] == expected[i], f"{name} T={tp} P={pp}: prompt of {len(prompt)}"
        ours, theirs = got["logprobs"][i], [lp.logprob for lp in plain[i].logprobs[0]]
        assert len(ours) == len(theirs)
        assert max((abs(a - b) for a, b in zip(ours, theirs, strict=True)), default=0.0) < 1e-4
    assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] > 0  # drafts were proposed and judged
    if name.endswith("preempted"):  # (other blocks than T = 1's: other steps, other drafts)
        assert got["num_preemptions"] > 0
    else:  # the same drafts as at T = 1
        assert {k: spec[k] for k in counters} == counters
        assert got["proposals"] == proposals
    print(
        f"{name} T={tp} P={pp}: {spec['num_drafts']} verifications, acceptance "
        f"{spec['acceptance_rate']:.2f}, mean accepted length {spec['mean_accepted_length']:.2f}"
    )


def test_eagle3_with_pipeline_stages_is_refused_at_start(models: dict[str, Path]) -> None:
    """EAGLE-3's aux layers' streams stay on the stages holding them: a one-line start-up error
    (EAGLE-1 reads stage 0's final hidden states, and speculation itself is no longer refused)."""
    from services.worker.model_config import ModelConfigError, load_model_config
    from services.worker.speculative.eagle import check_pipeline
    from services.worker.speculative.eagle_head import read_layout

    target = load_model_config(str(models["target"]))
    eagle3 = read_layout(load_model_config(str(models["eagle3"])), target)
    with pytest.raises(
        ModelConfigError,
        match=r"EAGLE-3 head with --pipeline-parallel-size 2: it reads target layers \[0, 1\]",
    ):
        check_pipeline(eagle3, 2, "--speculative-model x")
    check_pipeline(eagle3, 1, "--speculative-model x")
    check_pipeline(read_layout(load_model_config(str(models["eagle"])), target), 2, "--speculative-model x")
    for method in ("prompt-lookup", "draft-model", "eagle"):
        model = "" if method == "prompt-lookup" else "d"
        config = WorkerConfig(
            model="m",
            speculative=method,
            speculative_model=model,
            tensor_parallel_size=2,
            pipeline_parallel_size=2,
        )  # type: ignore[arg-type]
        assert config.world_size == 4


def test_single_rank_is_this_threads_alone(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`parallel.single_rank()` gives whole layouts and no collective on the calling thread only:
    rank 0's ping thread keeps talking to the group meanwhile."""
    import threading

    from services.worker import parallel
    from services.worker.model_config import load_model_config

    cfg = load_model_config(str(models["target"]))
    group = parallel.ParallelState(tp_size=2, tp_rank=0)
    monkeypatch.setattr(parallel, "_STATE", group)
    assert parallel.shard_layout(cfg).num_heads == 2
    seen: list[parallel.ParallelState] = []
    with parallel.single_rank():
        assert parallel.current().world_size == 1
        assert parallel.shard_layout(cfg).num_heads == 4
        x = torch.ones(3)
        assert parallel.all_reduce(x) is x  # (no process group exists here: a collective would raise)
        other = threading.Thread(target=lambda: seen.append(parallel.current()))
        other.start()
        other.join()
    assert seen == [group]
    assert parallel.current() is group
