"""Every `WorkerInfo` field against a running `tandem worker` (stories260K, CPU, real gRPC).

Four workers: the CPU default (float32 weights and cache), bfloat16 weights with a cache in the
model dtype, bfloat16 weights with `--kv-cache-dtype fp8`, and `--quantization int8` (its
weight_bytes shrink). `kv_layout.dtype` is the cache's element type (float8_e4m3fn under fp8), `dtype` the model's. The gateway, reading those Infos,
names the two cache dtypes when it refuses to pair an fp8 prefill worker with a bfloat16 decode one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import tandem
from services.common.server import wait_for_serving
from services.worker import kv_transports
from tandem.v1 import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
KV_MEMORY = 256 * 1024  # --kv-cache-memory 256KiB: 12 float32 blocks of 16 tokens (fp8: 51)
MAX_MODEL_LEN = 128
BLOCK_SIZE = 16
MAX_NUM_SEQS = 8
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]
    dtype: str  # the model's
    kv_dtype: str  # the cache's
    role: int


VARIANTS = (
    Variant("fp32", ("--served-model-name", "tiny"), "float32", "float32", worker_pb2.WORKER_ROLE_UNIFIED),
    Variant(
        "bf16",
        ("--dtype", "bfloat16", "--role", "decode"),
        "bfloat16",
        "bfloat16",
        worker_pb2.WORKER_ROLE_DECODE,
    ),
    Variant(
        "bf16-fp8kv",
        ("--dtype", "bfloat16", "--kv-cache-dtype", "fp8", "--role", "prefill"),
        "bfloat16",
        "float8_e4m3fn",
        worker_pb2.WORKER_ROLE_PREFILL,
    ),
    Variant("int8", ("--quantization", "int8"), "float32", "float32", worker_pb2.WORKER_ROLE_UNIFIED),
    Variant(
        "spec",
        ("--speculative", "prompt-lookup", "--num-speculative-tokens", "3"),
        "float32",
        "float32",
        worker_pb2.WORKER_ROLE_UNIFIED,
    ),
)


@pytest.fixture(scope="module")
def addresses(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The three workers, started together (each pays its own torch import)."""
    sock_dir = tmp_path_factory.mktemp("info")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    common = [
        "--model",
        str(stories_dir),
        "--device",
        "cpu",
        "--cpu-threads",
        "1",
        "--kv-cache-memory",
        str(KV_MEMORY),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--block-size",
        str(BLOCK_SIZE),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
    ]
    addresses = {v.name: f"unix:{sock_dir / (v.name + '.sock')}" for v in VARIANTS}
    try:
        for v in VARIANTS:
            cmd = [
                sys.executable,
                "-m",
                "tandem.cli",
                "worker",
                *common,
                "--address",
                addresses[v.name],
                *v.args,
            ]
            procs[v.name] = subprocess.Popen(cmd, cwd=REPO, env=env)

        async def serving(name: str) -> None:
            while True:  # fail at once when a worker exits instead of waiting for the timeout
                assert procs[name].poll() is None, f"worker {name} exited with {procs[name].returncode}"
                try:
                    return await wait_for_serving(addresses[name], timeout_s=1)
                except TimeoutError:
                    continue

        async def all_serving() -> None:
            await asyncio.wait_for(asyncio.gather(*(serving(v.name) for v in VARIANTS)), 180)

        asyncio.run(all_serving())
        yield addresses
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert proc.wait(timeout=30) == 0


def info_of(address: str) -> worker_pb2.WorkerInfo:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)


def expected_info(variant: Variant, stories_dir: Path) -> dict[str, object]:
    """Every WorkerInfo field, from the model's config.json and the command line."""
    cfg = json.loads((stories_dir / "config.json").read_text())
    num_layers, num_kv_heads, head_dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    block_bytes = num_layers * 2 * BLOCK_SIZE * num_kv_heads * head_dim * ELEMENT_BYTES[variant.kv_dtype]
    blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
    served = (
        variant.args[variant.args.index("--served-model-name") + 1]
        if "--served-model-name" in variant.args
        else None
    )
    return {
        "weight_bytes": expected_weight_bytes(variant, stories_dir),
        "quantization": "int8" if "--quantization" in variant.args else "none",
        "model_name": served or stories_dir.resolve().name,
        "architecture": cfg["architectures"][0],
        "dtype": variant.dtype,
        "max_model_len": MAX_MODEL_LEN,
        "block_size": BLOCK_SIZE,
        "role": variant.role,
        "kv_layout": {
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "block_size": BLOCK_SIZE,
            "dtype": variant.kv_dtype,
            "layout": "[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]",
            "model_num_layers": num_layers,  # one rank: its layers and KV heads are the model's
            "model_num_kv_heads": num_kv_heads,
        },
        "vocab_size": cfg["vocab_size"],
        "eos_token_ids": [1, 2],  # config.json's eos_token_id and generation_config.json's
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "device": "cpu",
        "fingerprint": "<16 hex digits>",
        "num_kv_blocks": min(KV_MEMORY // block_bytes, blocks_per_seq * MAX_NUM_SEQS + 1),
        "max_num_seqs": MAX_NUM_SEQS,
        "version": tandem.__version__,
        "kv_transports": [worker_pb2.KV_TRANSPORT_GRPC],  # no CUDA here, NIXL not available
        "host_id": kv_transports.host_id(),
        "kv_events": True,  # prefix caching is on
        "task": worker_pb2.WORKER_TASK_GENERATE,
        "hidden_size": cfg["hidden_size"],
        "speculative": {
            "method": "prompt-lookup",
            "num_speculative_tokens": 3,
            "draft_model": "",
            "num_draft_tokens": 0,
            "num_accepted_tokens": 0,
            "acceptance_rate": 0.0,
            "mean_accepted_length": 0.0,
        }
        if variant.name == "spec"
        else None,
        "kv_peer_transfers": [],  # nothing fetched from a prefill worker (tests/disagg/test_kv_peer_stats.py)
        "kv_layerwise": True,  # not a parallel group: layer-wise push (tests/disagg/test_kv_layerwise.py)
        "num_images_encoded": 0,  # a text model encodes no image (tests/multimodal/test_qwen2_5_vl_up.py counts them)
        "num_encoder_cache_hits": 0,
        "encoder_cache_size": 0,  # a text model takes no images, by hash or otherwise
        "num_images_by_hash": 0,  # (tests/multimodal/test_hash_resend.py counts them)
        "num_image_hash_misses": 0,
        "image_bytes_received": 0,
    }


def expected_weight_bytes(variant: Variant, stories_dir: Path) -> int:
    """The checkpoint's tensors in the model dtype; under int8 each projection [N, K] is N * K
    bytes plus N fp32 scales (the tied LM head is the embedding, counted once)."""
    from safetensors import safe_open

    total = 0
    for path in stories_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                rows, *rest = f.get_slice(name).get_shape()
                numel = rows * (rest[0] if rest else 1)
                if "--quantization" in variant.args and name.endswith("_proj.weight"):
                    total += numel + 4 * rows
                else:
                    total += numel * ELEMENT_BYTES[variant.dtype]
    return total


def as_dict(info: worker_pb2.WorkerInfo) -> dict[str, object]:
    got: dict[str, object] = {}
    for field in worker_pb2.WorkerInfo.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        if field.name == "kv_layout":
            value = {f.name: getattr(value, f.name) for f in worker_pb2.KVLayout.DESCRIPTOR.fields}
        elif field.name == "speculative":
            fields = worker_pb2.SpeculativeInfo.DESCRIPTOR.fields
            value = {f.name: getattr(value, f.name) for f in fields} if info.HasField("speculative") else None
        elif field.name == "kv_peer_transfers":
            value = list(value)
        elif field.name == "eos_token_ids":
            value = sorted(value)
        elif field.name == "fingerprint":
            value = "<16 hex digits>" if re.fullmatch(r"[0-9a-f]{16}", value) else value
        got[field.name] = value
    return got


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_info_field(addresses: dict[str, str], stories_dir: Path, variant: Variant) -> None:
    expected = expected_info(variant, stories_dir)
    # every field of the message is checked, including fields added later
    assert set(expected) == {f.name for f in worker_pb2.WorkerInfo.DESCRIPTOR.fields}
    assert as_dict(info_of(addresses[variant.name])) == expected


def test_fingerprints_tell_the_kv_caches_apart(addresses: dict[str, str]) -> None:
    fingerprints = {name: info_of(address).fingerprint for name, address in addresses.items()}
    assert len(set(fingerprints.values())) == len(VARIANTS), fingerprints


def test_gateway_names_the_kv_dtypes_when_it_refuses_a_pair(addresses: dict[str, str]) -> None:
    from gateway.clients import WorkerClient
    from gateway.disaggregation import incompatibility

    async def infos() -> tuple[object, object]:
        prefill, decode = WorkerClient(addresses["bf16-fp8kv"]), WorkerClient(addresses["bf16"])
        try:
            return await prefill.info(), await decode.info()
        finally:
            await prefill.close()
            await decode.close()

    prefill_info, decode_info = asyncio.run(infos())
    reason = incompatibility(prefill_info, decode_info)  # type: ignore[arg-type]
    assert "KV cache dtype 'float8_e4m3fn' != 'bfloat16'" in reason, reason
    assert "fingerprint" not in reason  # the dtypes explain it: no opaque fingerprints
