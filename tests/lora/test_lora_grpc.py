"""LoRA over the worker's gRPC API, on a real `tandem worker` process: adapters from
--lora-modules, LoadLoRA / UnloadLoRA / ListLoRAs at run time while requests stream, NOT_FOUND for
an adapter the worker does not serve, and INVALID_ARGUMENT naming what is wrong with a bad one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from lora_testlib import Adapter, make_adapter
from worker_testlib import RefModel, prompts_of_lengths

from services.common.server import wait_for_serving
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def worker(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[worker_pb2_grpc.WorkerStub, RefModel, list[Adapter]]]:
    base, adapters = lora_family["llama"]
    addr = f"unix:{tmp_path_factory.mktemp('lora-worker') / 'w.sock'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", str(base.path), "--address", addr, "--kv-cache-memory", "16MiB", "--device", "cpu"]
    args += ["--lora-modules", f"alpha={adapters[0].path}", "--max-loras", "2", "--max-lora-rank", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=90))
        with grpc.insecure_channel(addr) as channel:
            yield worker_pb2_grpc.WorkerStub(channel), base, adapters
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _request(rid: str, prompt: list[int], lora: str, max_tokens: int = 10) -> worker_pb2.GenerateRequest:
    sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, lora_name=lora)


def _tokens(chunks: object) -> list[int]:
    return [t for chunk in chunks for c in chunk.choices for t in c.token_ids]  # type: ignore[attr-defined]


def test_load_unload_list_under_load(
    worker: tuple[worker_pb2_grpc.WorkerStub, RefModel, list[Adapter]],
) -> None:
    stub, base, adapters = worker
    alpha, beta, gamma = adapters
    listed = stub.ListLoRAs(worker_pb2.ListLoRAsRequest())
    assert [a.lora_name for a in listed.adapters] == ["alpha"] and listed.max_loras == 2
    assert listed.max_lora_rank == 16 and listed.adapters[0].rank == 8 and listed.adapters[0].digest
    (prompt,) = prompts_of_lengths([11], base.vocab_size, seed=3)
    # an alpha request streams while beta and gamma are loaded, and beta is unloaded again
    stream = stub.Generate(_request("long", prompt, "alpha", max_tokens=40), timeout=120)
    first = next(stream)
    info = stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="beta", lora_path=str(beta.path)))
    assert (info.lora_name, info.rank) == ("beta", 4)
    stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="gamma", lora_path=str(gamma.path)))
    # three adapters at once through two slots, and the base model, beside the long request
    for name, ref in (("beta", beta.ref), ("gamma", gamma.ref), ("", base), ("alpha", alpha.ref)):
        got = _tokens(stub.Generate(_request(f"r-{name}", prompt, name), timeout=60))
        assert got == ref.greedy(prompt, 10), name
    stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name="beta"))
    assert _tokens([first, *stream]) == alpha.ref.greedy(prompt, 40)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_request("gone", prompt, "beta"), timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'beta'" in str(err.value.details())
    names = [a.lora_name for a in stub.ListLoRAs(worker_pb2.ListLoRAsRequest()).adapters]
    assert names == ["alpha", "gamma"]
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name="beta"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # loaded again under the same name: served again
    stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name="beta", lora_path=str(beta.path)))
    assert _tokens(stub.Generate(_request("again", prompt, "beta"), timeout=60)) == beta.ref.greedy(
        prompt, 10
    )
    stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name="beta"))
    stub.UnloadLoRA(worker_pb2.UnloadLoRARequest(lora_name="gamma"))


def test_bad_adapters_are_invalid_argument(
    worker: tuple[worker_pb2_grpc.WorkerStub, RefModel, list[Adapter]],
    lora_family: dict[str, tuple[RefModel, list[Adapter]]],
    tmp_path: Path,
) -> None:
    stub, base, adapters = worker
    too_big = make_adapter(base, tmp_path / "r32", "big", seed=4, rank=32)
    other_base = lora_family["qwen3"][1][0].path  # head_dim 32: q/k/v widths differ from this Llama's
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((adapters[0].path / "adapter_config.json").read_text())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text((adapters[0].path / "adapter_config.json").read_text())
    (garbage / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    lm_head = tmp_path / "lm-head"
    make_adapter(base, lm_head, "head", seed=5, target_modules=["q_proj", "lm_head"])
    cases = {
        "missing": (str(tmp_path / "nowhere"), "is not a directory"),
        "no-weights": (str(no_weights), "adapter_model.safetensors is missing"),
        "garbage": (str(garbage), "not a valid safetensors file"),
        "big": (str(too_big.path), "rank 32 is above --max-lora-rank 16"),
        "other-base": (str(other_base), "different base model"),
        "head": (str(lm_head), "not a LoRA weight of a decoder projection"),
        "alpha": (str(adapters[0].path), "already loaded"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadLoRA(worker_pb2.LoadLoRARequest(lora_name=name, lora_path=path))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert message in str(err.value.details()), (name, err.value.details())
    names = [a.lora_name for a in stub.ListLoRAs(worker_pb2.ListLoRAsRequest()).adapters]
    assert "big" not in names and "head" not in names


def test_lora_off_refuses_load(
    lora_family: dict[str, tuple[RefModel, list[Adapter]]], tmp_path: Path
) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine
    from services.worker.lora.adapter import LoRAAdapterError

    base, adapters = lora_family["llama"]
    engine = Engine(WorkerConfig(model=str(base.path), device="cpu", kv_cache_memory="16MiB"))
    assert engine.runner.lora is None
    with pytest.raises(LoRAAdapterError, match="LoRA is off"):
        engine.loras.load("alpha", str(adapters[0].path))
