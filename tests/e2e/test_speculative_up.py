"""`tandem up --speculative-model` end to end: the openai client's greedy completions through a
gateway whose worker speculates with a draft model (the model itself), with the drafts counted
in the worker's /metrics; the text equals that of `tandem up` without speculation (one stack
each, started together)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai

from tests.e2e.stack import UpProcess, free_port

PROMPTS = ["Once upon a time, there was a little", "The cat and the dog went to the park. The cat"]


def completions(up: UpProcess) -> list[str]:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="none")
    texts = []
    for prompt in PROMPTS:
        reply = client.completions.create(model="stories", prompt=prompt, max_tokens=40, temperature=0.0)
        texts.append(reply.choices[0].text)
    return texts


class Stack:
    """`tandem up` on stories260K (the worker's /metrics on a port of its own)."""

    def __init__(self, stories_dir: Path, *args: str) -> None:
        self.metrics_port = free_port()
        self.up = UpProcess(
            stories_dir,
            "--served-model-name",
            "stories",
            "--device",
            "cpu",
            "--worker-args",
            f"--metrics-port {self.metrics_port}",
            *args,
        )

    def texts_and_metrics(self) -> tuple[list[str], str]:
        self.up.wait_healthy(timeout_s=180)
        texts = completions(self.up)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return texts, response.read().decode()


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_greedy_completions_are_the_same_with_a_draft_model(stories_dir: Path) -> None:
    speculating = Stack(stories_dir, "--speculative-model", str(stories_dir), "--num-speculative-tokens", "3")
    plain = Stack(stories_dir)
    try:
        spec_texts, spec_metrics = speculating.texts_and_metrics()
        plain_texts, _ = plain.texts_and_metrics()
    finally:
        stopped = [(stack.up.stop(), stack.up) for stack in (speculating, plain)]
    for status, up in stopped:
        assert status == 0, up.output()[-3000:]
    assert all(spec_texts)
    assert metric(spec_metrics, "tandem:spec_decode_draft_tokens") > 0
    assert metric(spec_metrics, "tandem:spec_decode_acceptance_rate") == 1.0
    assert spec_texts == plain_texts
