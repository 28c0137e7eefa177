"""`tandem up --speculative-model` end to end: the openai client's greedy completions through a
gateway whose worker speculates with a draft model (the model itself) or an EAGLE-3 head (random
weights), with the drafts counted in the worker's /metrics; the text equals that of `tandem up`
without speculation (one stack each, one after the other)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai
import pytest

from tests.e2e.stack import UpProcess, free_port
from tests.worker.eagle_testlib import head_config, random_head_tensors, write_head

PROMPTS = ["Once upon a time, there was a little", "The cat and the dog went to the park. The cat"]


def completions(up: UpProcess) -> list[str]:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="none")
    texts = []
    for prompt in PROMPTS:
        reply = client.completions.create(model="stories", prompt=prompt, max_tokens=40, temperature=0.0)
        texts.append(reply.choices[0].text)
    return texts


def run_stack(stories_dir: Path, *args: str, worker_args: str = "") -> tuple[list[str], str]:
    metrics_port = free_port()
    up = UpProcess(
        stories_dir,
        "--served-model-name",
        "stories",
        "--device",
        "cpu",
        "--worker-args",
        f"--metrics-port {metrics_port} {worker_args}",
        *args,
    )
    try:
        up.wait_healthy(timeout_s=180)
        texts = completions(up)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        assert up.stop() == 0, up.output()[-3000:]
    return texts, metrics


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def plain_texts(stories_dir: Path) -> list[str]:
    texts, _ = run_stack(stories_dir)
    assert all(texts)
    return texts


def test_greedy_completions_are_the_same_with_a_draft_model(
    stories_dir: Path, plain_texts: list[str]
) -> None:
    spec_texts, spec_metrics = run_stack(
        stories_dir, "--speculative-model", str(stories_dir), "--num-speculative-tokens", "3"
    )
    assert metric(spec_metrics, "tandem:spec_decode_draft_tokens") > 0
    assert metric(spec_metrics, "tandem:spec_decode_acceptance_rate") == 1.0
    assert spec_texts == plain_texts


def test_greedy_completions_are_the_same_with_an_eagle_head(
    stories_dir: Path, plain_texts: list[str], tmp_path: Path
) -> None:
    """`tandem up --speculative eagle --speculative-model HEAD` (an EAGLE-3 checkpoint reading
    stories260K's layers 1, 2 and 4; drafting on every step: a random head is never worth it)."""
    cfg = head_config(stories_dir, True, draft_vocab_size=200, eagle_aux_hidden_state_layer_ids=[1, 2, 4])
    head = write_head(tmp_path / "eagle3-head", cfg, random_head_tensors(cfg, True, seed=3))
    spec_texts, spec_metrics = run_stack(
        stories_dir,
        "--speculative",
        "eagle",
        "--speculative-model",
        str(head),
        "--num-speculative-tokens",
        "3",
        worker_args="--no-speculative-adaptive",
    )
    assert metric(spec_metrics, "tandem:spec_decode_draft_tokens") > 0
    assert 0.0 <= metric(spec_metrics, "tandem:spec_decode_acceptance_rate") < 1.0
    assert metric(spec_metrics, "tandem:spec_decode_mean_accepted_length") >= 1.0
    assert spec_texts == plain_texts
