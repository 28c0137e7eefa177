"""`tandem up` forwards the LoRA options to its workers, and a disaggregated stack carries the
adapter from the prefill worker to the decode worker: the adapter's tokens through the openai
client equal transformers with the adapter merged, for an adapter given at start and one loaded
over HTTP (which reaches both workers)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest
from lora_testlib import expected_text, make_adapter
from worker_testlib import load_ref

from services.common.config import parse_config
from tandem.up import UpConfig, forwarded_worker_args
from tests.e2e.stack import UpProcess

PROMPT = [1, 403, 407, 365, 261, 422, 300, 290, 280, 270, 260, 250, 240, 230, 220, 210, 200, 190]


def test_up_forwards_lora_options() -> None:
    config = parse_config(
        UpConfig,
        [
            "--model",
            "m",
            "--lora-modules",
            "a=/x",
            "--lora-modules",
            "b=/y",
            "--max-loras",
            "3",
            "--max-lora-rank",
            "32",
        ],
        prog="up",
    )
    assert forwarded_worker_args(config) == [
        *("--lora-modules", "a=/x", "--lora-modules", "b=/y"),
        *("--max-loras", "3", "--max-lora-rank", "32"),
    ]


def test_disaggregated_up_carries_the_adapter(stories_dir: Path, tmp_path: Path) -> None:
    base = load_ref(stories_dir)
    first = make_adapter(base, tmp_path / "a", "story-a", seed=31, rank=8, scale=1.0)
    second = make_adapter(base, tmp_path / "b", "story-b", seed=32, rank=8, scale=1.0)
    up = UpProcess(
        stories_dir,
        "--disaggregate",
        "--device",
        "cpu",
        "--lora-modules",
        f"story-a={first.path}",
        "--max-lora-rank",
        "8",
    )
    try:
        up.wait_healthy(240)
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="none", max_retries=0)
        for model, ref in (("story-a", first.ref), (client.models.list().data[0].id, base)):
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
            assert out.choices[0].text == expected_text(client, ref, PROMPT, 10), model
        body = json.dumps({"lora_name": "story-b", "lora_path": str(second.path)}).encode()
        req = urllib.request.Request(
            up.url + "/v1/load_lora_adapter", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as reply:
            assert reply.status == 200
        out = client.completions.create(model="story-b", prompt=PROMPT, max_tokens=10, temperature=0)
        assert out.choices[0].text == expected_text(client, second.ref, PROMPT, 10)
        # (a prefill worker that did not serve the adapter would fail the request: NOT_FOUND)
        health = json.loads(urllib.request.urlopen(up.url + "/health", timeout=10).read())
        assert list(health["prefill_worker"].values()) == [True]
    finally:
        assert up.stop() == 0, up.output()[-3000:]


@pytest.mark.e2e
@pytest.mark.slow  # (a stack with two worker ranks: ~60 s on a loaded 2-core machine)
def test_tensor_parallel_up_serves_adapters(stories_dir: Path, tmp_path: Path) -> None:
    """`tandem up --tensor-parallel-size 2` with an adapter from the start and one loaded over HTTP
    (both ranks load their shards): each adapter's text through the openai client is transformers'
    with it merged."""
    base = load_ref(stories_dir)
    first = make_adapter(base, tmp_path / "a", "story-a", seed=31, rank=8, scale=1.0)
    second = make_adapter(base, tmp_path / "b", "story-b", seed=32, rank=8, scale=1.0)
    up = UpProcess(
        stories_dir,
        "--tensor-parallel-size",
        "2",
        "--device",
        "cpu",
        "--lora-modules",
        f"story-a={first.path}",
        "--max-lora-rank",
        "8",
        "--worker-args",
        "--kv-cache-memory 8MiB --cpu-threads 1",
    )
    try:
        up.wait_healthy(240)
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="none", max_retries=0)
        body = json.dumps({"lora_name": "story-b", "lora_path": str(second.path)}).encode()
        req = urllib.request.Request(
            up.url + "/v1/load_lora_adapter", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as reply:
            assert reply.status == 200
        base_name = client.models.list().data[0].id
        for model, ref in (("story-a", first.ref), ("story-b", second.ref), (base_name, base)):
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
            assert out.choices[0].text == expected_text(client, ref, PROMPT, 10), model
    finally:
        assert up.stop() == 0, up.output()[-3000:]
