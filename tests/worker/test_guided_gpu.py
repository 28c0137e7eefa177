"""Guided decoding on CUDA with the fast paths on: decode CUDA graphs (LM head + argmax inside the
graph for small batches), the GPU sampler and async scheduling. The constraints must hold, and
unguided requests batched with guided ones must keep exactly the tokens they get alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from guided_testlib import (
    CHECKS,
    JSON_OBJECT_SPEC,
    SPECS,
    check_json_object,
    decode,
    load_tokenizer,
    save_tiny_llama,
)
from tokenizers import Tokenizer
from worker_testlib import run_to_completion

from services.worker.config import WorkerConfig
from services.worker.engine import Engine, GenerateResult
from services.worker.request import EngineRequest, SamplingParams

pytestmark = pytest.mark.gpu

FAST: dict[str, Any] = dict(
    device="cuda", async_scheduling="on", enforce_eager=False, max_num_seqs=32, max_model_len=256
)


@pytest.fixture(autouse=True)
def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, head_dim 16: the Triton kernels capture CUDA graphs for it (stories260K's
    head_dim 8 runs eagerly)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), uniform=False)


def text_of(tokenizer: Tokenizer, result: GenerateResult, index: int = 0) -> str:
    ids = result.token_ids[index]
    if result.stop_token_ids.get(index) is not None:
        ids = ids[:-1]
    return decode(tokenizer, ids)


@pytest.mark.parametrize("model", ["stories", "tiny"])
@pytest.mark.parametrize("kind", ["regex", "choice", "json_schema"])
def test_constraints_hold_on_cuda(
    stories_dir: Path, tiny_dir: Path, tokenizer: Tokenizer, model: str, kind: str
) -> None:
    path = stories_dir if model == "stories" else tiny_dir
    engine = Engine(
        WorkerConfig(model=str(path), tokenizer=str(stories_dir), kv_cache_memory="64MiB", **FAST)
    )
    assert engine.async_scheduling
    assert (engine.runner.graphs is not None) == (model == "tiny")
    prompt = tokenizer.encode("Once upon a time, there was a girl named").ids
    # 12 choices: more rows than the in-graph LM head takes (8), then fewer as they finish
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=150, guided=SPECS[kind]) for s in range(11)]
    params.append(SamplingParams(temperature=0.0, max_tokens=150, guided=SPECS[kind]))
    for result in engine.generate([prompt] * len(params), params):
        assert result.finish_reasons == {0: "stop"}, result
        CHECKS[kind](text_of(tokenizer, result))


def test_json_object_on_cuda(tmp_path: Path, stories_dir: Path, tokenizer: Tokenizer) -> None:
    model = save_tiny_llama(tmp_path / "uniform", uniform=True)
    engine = Engine(
        WorkerConfig(model=str(model), tokenizer=str(stories_dir), kv_cache_memory="64MiB", **FAST)
    )
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=48, guided=JSON_OBJECT_SPEC) for s in range(24)
    ]
    stopped = 0
    for result in engine.generate([[1, 5, 6]] * len(params), params):
        if result.finish_reasons[0] == "stop":
            check_json_object(text_of(tokenizer, result))
            stopped += 1
        else:
            assert result.finish_reasons[0] == "length" and len(result.token_ids[0]) == 48
    assert stopped >= 3


def test_unguided_neighbours_keep_their_tokens_on_cuda(
    tiny_dir: Path, stories_dir: Path, tokenizer: Tokenizer
) -> None:
    """fp32, so the in-graph argmax and the sampler's argmax of the same logits agree exactly."""
    engine = Engine(
        WorkerConfig(
            model=str(tiny_dir), tokenizer=str(stories_dir), dtype="float32", kv_cache_memory="64MiB", **FAST
        )
    )
    assert engine.runner.graphs is not None
    free = [
        EngineRequest("greedy", (1, 403, 407), SamplingParams(temperature=0.0, max_tokens=40)),
        EngineRequest("seeded", (1, 306, 260), SamplingParams(temperature=0.8, seed=7, max_tokens=40)),
    ]
    alone = run_to_completion(engine, free)
    assert engine.num_continuations > 0  # the overlap is on for unguided steps
    prompt = tuple(tokenizer.encode("Once upon a time").ids)
    guided = [
        EngineRequest("regex", prompt, SamplingParams(temperature=1.0, seed=3, n=2, guided=SPECS["regex"])),
        EngineRequest("schema", prompt, SamplingParams(temperature=1.0, seed=4, guided=SPECS["json_schema"])),
    ]
    mixed = run_to_completion(engine, [guided[0], free[0], guided[1], free[1]])
    for rid in ("greedy", "seeded"):
        assert mixed[rid].token_ids == alone[rid].token_ids, rid
    for index in (0, 1):
        CHECKS["regex"](text_of(tokenizer, mixed["regex"], index))
    CHECKS["json_schema"](text_of(tokenizer, mixed["schema"]))
