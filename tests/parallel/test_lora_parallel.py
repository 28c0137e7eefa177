"""LoRA adapters in tensor- and pipeline-parallel groups on the CPU (gloo): each rank holds its
shard of every adapter (column-parallel A whole and B by output rows, row-parallel A by input
columns and B whole, the delta inside the layer's one all-reduce). Three adapters and the base
model in one batch give T = 2 and T = 2 x P = 2 the greedy tokens of T = 1 and of transformers
with each adapter merged (PEFT merge_and_unload), logprobs within 1e-4; LoadLoRA / UnloadLoRA on
a T = 2 `tandem worker` while requests stream reach every rank."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.common.server import wait_for_serving
from services.worker.request import EngineRequest, SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.lora.lora_testlib import Adapter, make_adapters, save_base
from tests.parallel.conftest import REPO, _llama, run_group
from tests.worker.worker_testlib import RefModel, prompts_of_lengths

LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5]  # the long ones are chunked (budget 16)
MAX_TOKENS = 10
NAMES = ["", "alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefModel, list[Adapter]]:
    """A 2-layer Llama (4 query heads, 2 KV heads, a vocabulary that does not split evenly) and
    three adapters: every projection; attention only with rsLoRA; the MLP and k_proj only."""
    base = save_base(lambda: _llama(vocab_size=321), tmp_path_factory.mktemp("lora-tp-base"))
    return base, make_adapters(base, tmp_path_factory, "lora-tp")


def _worker_options(base: RefModel, adapters: list[Adapter]) -> list[str]:
    options = ["--model", str(base.path), "--device", "cpu", "--kv-cache-memory", "4MiB"]
    options += ["--max-num-batched-tokens", "16", "--cpu-threads", "1", "--max-lora-rank", "16"]
    for a in adapters:
        options += ["--lora-modules", f"{a.name}={a.path}"]
    return options


def _single_rank(
    base: RefModel, adapters: list[Adapter], prompts: list[list[int]], names: list[str]
) -> list[tuple[list[int], list[float]]]:
    """T = 1: tokens and logprobs of each prompt under its adapter, all in one engine at once."""
    engine = base.engine(
        kv_cache_memory="4MiB",
        max_num_batched_tokens=16,
        lora_modules=tuple(f"{a.name}={a.path}" for a in adapters),
        max_lora_rank=16,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    reqs = [
        EngineRequest(f"r{i}", tuple(p), sp, lora_name=n)
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    return [(r.token_ids[0], [lp.logprob for lp in r.logprobs[0]]) for r in engine.run(reqs)]


def _check_group(lora_base: tuple[RefModel, list[Adapter]], tmp_path: Path, tp: int, pp: int) -> None:
    base, adapters = lora_base
    refs = {"": base, **{a.name: a.ref for a in adapters}}
    prompts = prompts_of_lengths(LENGTHS * 2, base.vocab_size, seed=3)
    names = [NAMES[i % len(NAMES)] for i in range(len(prompts))]
    got = run_group(
        tmp_path,
        {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 3, "lora_names": names},
        *_worker_options(base, adapters),
        "--tensor-parallel-size",
        str(tp),
        "--pipeline-parallel-size",
        str(pp),
    )
    assert got["used_blocks"] == 0
    single = _single_rank(base, adapters, prompts, names)
    differs = 0
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        expected = refs[name].greedy(prompt, MAX_TOKENS)
        tokens, logprobs = single[i]
        assert tokens == expected, f"T=1 {name!r}: prompt of {len(prompt)}"
        assert got["tokens"][i]["0"] == expected, f"T={tp} P={pp} {name!r}: prompt of {len(prompt)}"
        ours = got["logprobs"][i]
        assert len(ours) == len(logprobs)
        assert max((abs(a - b) for a, b in zip(ours, logprobs, strict=True)), default=0.0) < 1e-4
        differs += name != "" and expected != base.greedy(prompt, MAX_TOKENS)
    assert differs >= 6  # the adapters change the output: the test would see one not applied


def test_lora_t2_equals_t1_and_merged_transformers(
    lora_base: tuple[RefModel, list[Adapter]], tmp_path: Path
) -> None:
    _check_group(lora_base, tmp_path, tp=2, pp=1)


@pytest.mark.slow
def test_lora_t2_p2_equals_t1_and_merged_transformers(
    lora_base: tuple[RefModel, list[Adapter]], tmp_path: Path
) -> None:
    _check_group(lora_base, tmp_path, tp=2, pp=2)


@pytest.mark.slow
def test_lora_t4_replicated_kv_heads(lora_base: tuple[RefModel, list[Adapter]], tmp_path: Path) -> None:
    """T = 4 > 2 KV heads: each rank's k/v rows of B are its replicated head's."""
    _check_group(lora_base, tmp_path, tp=4, pp=1)


# ---- LoadLoRA / UnloadLoRA on a T = 2 worker, while requests stream ------------------------------
@pytest.fixture(scope="module")
def tp_worker(
    lora_base: tuple[RefModel, list[Adapter]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    base, adapters = lora_base
    addr = f"unix:{tmp_path_factory.mktemp('lora-tp-worker') / 'w.sock'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = ["--model", str(base.path), "--address", addr, "--kv-cache-memory", "8MiB", "--device", "cpu"]
    args += ["--cpu-threads", "1", "--tensor-parallel-size", "2"]
    args += ["--lora-modules", f"alpha={adapters[0].path}", "--max-loras", "2", "--max-lora-rank", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=180))
        with grpc.insecure_channel(addr) as channel:
            yield worker_pb2_grpc.WorkerStub(channel)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def _request(rid: str, prompt: list[int], lora: str, max_tokens: int = 10) -> worker_pb2.GenerateRequest:
    sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, lora_name=lora)


def _tokens(chunks: object) -> list[int]:
    return [t for chunk in chunks for c in chunk.choices for t in c.token_ids]  # type: ignore[attr-defined]


def test_load_unload_while_serving_on_t2(
    lora_base: tuple[RefModel, list[Adapter]], tp_worker: worker_pb2_grpc.WorkerStub
) -> None:
    stub = tp_worker
    base, (alpha, beta, gamma) = lora_base
    (prompt,) = prompts_of_lengths([11], base.vocab_size, seed=3)
    # an alpha request streams while beta and gamma are loaded on both ranks, and beta unloaded
    stream = stub.Generate(_request("long", prompt, "alpha", max_tokens=40), timeout=180)
    first = next(stream)
    info = stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="beta", lora_path=str(beta.path)))
    assert (info.lora_name, info.rank) == ("beta", 4)
    stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="gamma", lora_path=str(gamma.path)))
    # three adapters through two slots (refills replayed on rank 1), and the base model
    for name, ref in (("beta", beta.ref), ("gamma", gamma.ref), ("", base), ("alpha", alpha.ref)):
        got = _tokens(stub.Generate(_request(f"r-{name}", prompt, name), timeout=120))
        assert got == ref.greedy(prompt, 10), name
    stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name="beta"))
    assert _tokens([first, *stream]) == alpha.ref.greedy(prompt, 40)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_request("gone", prompt, "beta"), timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a bad adapter is refused and the group serves on
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="x", lora_path=str(base.path)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # beta under another name, gamma's path under beta's old name: each rank has the right shards
    stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="beta", lora_path=str(gamma.path)))
    stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="beta-2", lora_path=str(beta.path)))
    for name, ref in (("beta", gamma.ref), ("beta-2", beta.ref), ("alpha", alpha.ref)):
        got = _tokens(stub.Generate(_request(f"again-{name}", prompt, name), timeout=120))
        assert got == ref.greedy(prompt, 10), name


def test_a_dropped_adapter_is_released_to_the_other_ranks(lora_base: tuple[RefModel, list[Adapter]]) -> None:
    """The other ranks keep an adapter's shard while rank 0's copy lives (running requests of an
    unloaded adapter still refill slots), and are told to drop it with the forward after it dies."""
    import gc

    from services.worker import parallel
    from services.worker.lora.registry import LoRARegistry
    from services.worker.tp_group import StepDriver

    base, adapters = lora_base
    parallel.init_process_group(0, 1, 1, "127.0.0.1", parallel.free_port(), torch.device("cpu"), 60)
    driver = StepDriver(timeout_s=600)
    try:
        engine = base.engine(enable_lora=True, max_lora_rank=16)
        assert engine.runner.lora is not None
        registry = LoRARegistry(engine.runner.lora.shapes, 16, 4, driver.share_lora)
        registry.load("alpha", str(adapters[0].path))
        running = registry.get("alpha")  # a request that is running with it
        registry.unload("alpha")
        gc.collect()
        assert driver.take_released_loras() == ()  # still needed by the running request
        lora_id = running.lora_id
        del running
        gc.collect()
        assert driver.take_released_loras() == (lora_id,)
        assert driver.take_released_loras() == ()
    finally:
        driver.close()
        parallel.destroy_process_group()
