"""`tandem up --disaggregate` serves the OpenAI API with one prefill and one decode worker, also
when the two have different tensor-parallel sizes (KV re-sharded on fetch)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from stack import UpProcess

from services.worker.request import SamplingParams

pytestmark = pytest.mark.e2e


def test_up_disaggregate_serves_openai(stories_dir: Path) -> None:
    up = UpProcess(
        stories_dir,
        "--disaggregate",
        "--device",
        "cpu",
        "--worker-args",
        "--kv-cache-memory 16MiB --cpu-threads 1",
    )
    try:
        up.wait_healthy(120)
        with urllib.request.urlopen(up.url + "/health", timeout=5) as reply:
            health = json.loads(reply.read())
        assert list(health["prefill_worker"].values()) == [True] and all(health["worker"].values())
        oai = OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
        chat = oai.chat.completions.create(
            model="stories260K",
            messages=[{"role": "user", "content": "Once upon a time"}],
            max_tokens=16,
            temperature=0,
        )
        assert chat.choices[0].message.content and chat.usage is not None
        assert chat.usage.completion_tokens == 16 or chat.choices[0].finish_reason == "stop"
        streamed = "".join(
            c.choices[0].text
            for c in oai.completions.create(
                model="stories260K", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
            )
            if c.choices
        )
        whole = oai.completions.create(
            model="stories260K", prompt="Once upon a time", max_tokens=16, temperature=0
        )
        assert streamed == whole.choices[0].text != ""
        assert "fetched KV" in up.output()
    finally:
        assert up.stop() == 0


def _tiny_llama_one_kv_head(stories_dir: Path, path: Path) -> Path:
    """A random Llama with ONE KV head (replicated on both ranks of T = 2) and stories260K's
    tokenizer. Its LM head never prefers a byte token (rows 3..258 zero), so the greedy text
    decodes to whole characters and compares exactly."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.worker.worker_testlib import TINY

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": 512, "num_key_value_heads": 1}, num_hidden_layers=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[3:259] = 0
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / name, path / name)
    return path


def _wait_no_blocks(*addresses: str) -> None:
    import time

    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    deadline = time.monotonic() + 10
    while True:
        loads = []
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                loads.append(worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest()))
        if all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads):
            return
        assert time.monotonic() < deadline, f"leaked blocks or handles: {loads}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    ["--prefill-tensor-parallel-size=2", "--decode-tensor-parallel-size=2"],
    ids=["t2-prefill-to-t1-decode", "t1-prefill-to-t2-decode"],
)
def test_up_disaggregate_across_tensor_parallel_layouts(
    stories_dir: Path, tmp_path: Path, layout: str
) -> None:
    """A T = 2 prefill worker with a T = 1 decode worker (stories260K: 4 KV heads, two per rank),
    and a T = 1 prefill worker with a T = 2 decode worker (one KV head, replicated): the gateway
    pairs them, every fetch re-shards the KV, the greedy text equals a unified T = 1 engine's, and
    neither worker keeps a block or a handle."""
    from tokenizers import Tokenizer

    from tests.worker.worker_testlib import load_ref, prompts_of_lengths

    model = (
        stories_dir
        if layout.startswith("--prefill")
        else _tiny_llama_one_kv_head(stories_dir, tmp_path / "m")
    )
    run_dir = tmp_path / "run"
    up = UpProcess(
        model,
        "--disaggregate",
        layout,
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--worker-args",
        "--kv-cache-memory 8MiB --cpu-threads 1 --kv-chunk-bytes 4096",
    )
    try:
        up.wait_healthy(180)
        oai = OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
        ref = load_ref(model)
        engine = ref.engine(kv_cache_memory="8MiB")
        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        prompts = prompts_of_lengths([5, 17, 33, 40], ref.vocab_size, seed=4)
        for prompt, result in zip(
            prompts, engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16)), strict=True
        ):
            reply = oai.completions.create(model=model.name, prompt=prompt, max_tokens=16, temperature=0)
            # (decoded after the prompt, as the styler does: a first "▁word" keeps its space)
            text = tokenizer.decode(prompt + result.token_ids[0])[len(tokenizer.decode(prompt)) :]
            assert reply.choices[0].text == text
        log = up.output()
        assert log.count("fetched KV") == len(prompts) and "computing the prompt here" not in log
        assert "KV re-sharded on fetch" in log  # the gateway paired the two layouts
        _wait_no_blocks(f"unix:{run_dir / 'prefill-worker.sock'}", f"unix:{run_dir / 'decode-worker.sock'}")
    finally:
        assert up.stop() == 0
