"""The decode-path cost of LoRA: a step of base rows only launches no LoRA kernel, calls a worker
without LoRA's kernels in the same order and computes exactly what it computes (the same folded
forward, bit for bit), and steps with adapters still equal transformers with each adapter merged, in the folded decode forward (at most
FOLDED_MAX_TOKENS rows) and the plain one (prefill), on a base whose norm weights are not ones (the
pool folds them into the adapters' A)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from lora_testlib import Adapter, make_adapters, save_base
from worker_testlib import RefModel, prompts_of_lengths

from services.worker.engine import Engine, GenerateResult
from services.worker.request import EngineRequest, SamplingParams

MAX_TOKENS = 10


@dataclasses.dataclass
class Launches:
    shrink: int = 0
    expand: int = 0


# every projection; attention and gate_proj at a smaller rank; the largest rank, a smaller alpha
ADAPTERS: dict[str, dict[str, Any]] = {
    "alpha": {"seed": 1, "rank": 8},
    "beta": {"seed": 2, "rank": 4, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj"]},
    "gamma": {"seed": 3, "rank": 16, "alpha": 8},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefModel, list[Adapter]]:
    # (norm weights of ones would hide an unfolded A)
    base = save_base("llama", tmp_path_factory.mktemp("lora-folded-base"), norms_seed=7)
    return base, make_adapters(base, tmp_path_factory, "lora-folded", ADAPTERS)


def _engine(base: RefModel, adapters: list[Adapter] | None) -> Engine:
    from services.worker.config import WorkerConfig

    lora: dict[str, Any] = {}
    if adapters is not None:
        lora = {"lora_modules": tuple(f"{a.name}={a.path}" for a in adapters), "max_lora_rank": 16}
    return Engine(
        WorkerConfig(model=str(base.path), device="cpu", kv_cache_memory="16MiB", max_num_seqs=8, **lora)
    )


def _count_launches(engine: Engine) -> Launches:
    """Count the LoRA kernel calls of every projection (the bundle's own kernels, counted)."""
    pool = engine.runner.lora
    assert pool is not None
    counts = Launches()
    ops = engine.runner.ops

    def shrink(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts.shrink += 1
        return ops.lora_shrink(*args, **kwargs)

    def expand(*args: Any, **kwargs: Any) -> None:
        counts.expand += 1
        ops.lora_expand(*args, **kwargs)

    counted = dataclasses.replace(ops, lora_shrink=shrink, lora_expand=expand)
    for layer in pool.layers:
        for proj in layer.values():
            proj.ops = counted
    return counts


def _record_ops(engine: Engine) -> list[str]:
    """The names of the kernel ops the model's forwards call, in order, from now on (every module
    holding the bundle gets a copy whose callables append their name first)."""
    from kernels import KernelOps

    calls: list[str] = []
    ops = engine.runner.ops

    def recording(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    fields = {f.name: getattr(ops, f.name) for f in dataclasses.fields(ops)}
    recorded = dataclasses.replace(
        ops, **{k: recording(k, v) for k, v in fields.items() if callable(v) and k != "graph_capturable"}
    )
    holders: list[Any] = [
        m for m in engine.runner.model.modules() if isinstance(getattr(m, "ops", None), KernelOps)
    ]
    if engine.runner.lora is not None:
        holders += [proj for layer in engine.runner.lora.layers for proj in layer.values()]
    for holder in holders:
        holder.ops = recorded
    return calls


def _generate(engine: Engine, prompts: list[list[int]], names: list[str]) -> list[GenerateResult]:
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    requests = [
        EngineRequest(f"r{i}-{name}-{id(prompts)}", tuple(prompt), sp, lora_name=name)
        for i, (prompt, name) in enumerate(zip(prompts, names, strict=True))
    ]
    return engine.run(requests)


def test_base_steps_launch_no_lora_kernel_and_equal_a_worker_without_lora(
    setup: tuple[RefModel, list[Adapter]],
) -> None:
    base, adapters = setup
    with_lora, without = _engine(base, adapters), _engine(base, None)
    assert with_lora.runner.model.norms_folded and without.runner.model.norms_folded
    launches = _count_launches(with_lora)
    prompts = prompts_of_lengths([4, 11, 7], base.vocab_size, seed=3)
    got = _generate(with_lora, prompts, [""] * 3)
    assert launches == Launches(0, 0)  # prefill and decode steps of base rows: no LoRA kernel
    want = _generate(without, prompts, [""] * 3)
    for g, w in zip(got, want, strict=True):  # the same kernels: the same floats
        assert g.token_ids == w.token_ids
        assert [e.logprob for e in g.logprobs[0]] == [e.logprob for e in w.logprobs[0]]
    # one row of an adapter: one shrink and one expand per fused projection, every step it runs
    layers = len(with_lora.runner.lora.layers)  # type: ignore[union-attr]
    _generate(with_lora, prompts[:2], ["", "alpha"])
    assert launches.shrink == launches.expand == 4 * layers * MAX_TOKENS
    # and back to base rows only: none again
    before = dataclasses.replace(launches)
    _generate(with_lora, prompts[:1], [""])
    assert launches == before


def test_adapters_in_the_folded_decode_forward_match_merged_transformers(
    setup: tuple[RefModel, list[Adapter]],
) -> None:
    from services.worker.models.llama import FOLDED_MAX_TOKENS

    base, adapters = setup
    engine = _engine(base, adapters)
    assert engine.runner.model.norms_folded
    refs = {"": base, **{a.name: a.ref for a in adapters}}
    names = ["", "alpha", "beta", "gamma", "alpha", ""]
    assert len(names) <= FOLDED_MAX_TOKENS  # the decode steps take the folded forward
    prompts = prompts_of_lengths([5, 12, 3, 17, 8, 9], base.vocab_size, seed=11)
    results = _generate(engine, prompts, names)
    differs = 0
    for prompt, name, got in zip(prompts, names, results, strict=True):
        tokens, ref_logprobs = refs[name].greedy_with_logprobs(prompt, MAX_TOKENS)
        assert got.token_ids[0] == tokens, name
        for entry, ref_row in zip(got.logprobs[0], ref_logprobs, strict=True):
            assert math.isclose(entry.logprob, float(ref_row[entry.token_id]), abs_tol=1e-4), name
        differs += name != "" and tokens != base.greedy(prompt, MAX_TOKENS)
    assert differs >= 2  # the adapters change the output: the test would see them not applied


def test_base_steps_call_the_kernels_of_a_worker_without_lora(setup: tuple[RefModel, list[Adapter]]) -> None:
    """Kernel for kernel: the same ops in the same order (folded norms, no LoRA op), prefill and
    decode steps alike."""
    base, adapters = setup
    with_lora, without = _engine(base, adapters), _engine(base, None)
    got, want = _record_ops(with_lora), _record_ops(without)
    prompts = prompts_of_lengths([6, 13], base.vocab_size, seed=4)
    _generate(with_lora, prompts, ["", ""])
    _generate(without, prompts, ["", ""])
    assert "linear_rms_norm" in want and "lora_shrink" not in got  # (the folded forward ran)
    assert got == want
