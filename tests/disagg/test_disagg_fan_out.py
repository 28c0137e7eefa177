"""Prefill once, fan out, with real processes: n = 8, best_of and beam search under
disaggregation run one prefill on the prefill worker and one KV transfer to the decode worker
(counted by both workers' metrics), and give the same outputs as a unified worker."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from disagg_stack import Processes, free_port
from openai import OpenAI

pytestmark = pytest.mark.e2e

PROMPT = [1, *[(37 * k) % 509 + 3 for k in range(40)]]  # 41 tokens: several blocks and a partial one


@pytest.fixture(scope="module")
def stack(
    stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Processes, dict[str, int]]]:
    procs = Processes(tmp_path_factory.mktemp("fanout"), stories_dir)
    ports = {name: free_port() for name in ("prefill", "decode")}
    try:
        procs.styler()
        procs.worker("prefill", "--role", "prefill", "--metrics-port", str(ports["prefill"]))
        procs.worker("decode", "--role", "decode", "--metrics-port", str(ports["decode"]))
        procs.worker("unified")
        procs.gateway(
            "gw-disagg",
            "--prefill-worker",
            procs.address("prefill"),
            "--decode-worker",
            procs.address("decode"),
        )
        procs.gateway("gw-unified", "--worker", procs.address("unified"))
        procs.wait_healthy("gw-disagg")
        procs.wait_healthy("gw-unified")
        yield procs, ports
    finally:
        procs.stop()


def client(procs: Processes, gateway: str) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{procs.ports[gateway]}/v1", api_key="unused", max_retries=0)


def scrape(port: int) -> dict[str, float]:
    """The worker's prefill count and KV transfers (the transfer-seconds histogram's count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()

    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r" ([0-9.e+]+)", text))

    return {
        "prefills": value(r"tandem:prompt_prefills(?:\{[^}]*\})?"),
        "sent": value(r'tandem:kv_transfer_seconds_count\{[^}]*direction="send"[^}]*\}'),
        "received": value(r'tandem:kv_transfer_seconds_count\{[^}]*direction="receive"[^}]*\}'),
    }


REQUESTS: list[dict[str, Any]] = [
    {"n": 8, "temperature": 1.0, "seed": 5, "max_tokens": 16, "extra_body": {"ignore_eos": True}},
    {"n": 2, "temperature": 1.0, "seed": 9, "max_tokens": 12, "extra_body": {"best_of": 4}},
    {"n": 2, "max_tokens": 12, "extra_body": {"use_beam_search": True, "best_of": 4}},
]


@pytest.mark.parametrize("body", REQUESTS, ids=["n8", "best_of", "beam"])
def test_one_prefill_one_transfer_same_outputs(
    stack: tuple[Processes, dict[str, int]], body: dict[str, Any]
) -> None:
    procs, ports = stack
    expected = client(procs, "gw-unified").completions.create(model="stories260K", prompt=PROMPT, **body)
    before = {name: scrape(port) for name, port in ports.items()}
    reply = client(procs, "gw-disagg").completions.create(model="stories260K", prompt=PROMPT, **body)
    after = {name: scrape(port) for name, port in ports.items()}
    assert [c.text for c in reply.choices] == [c.text for c in expected.choices]
    assert len(reply.choices) == body["n"]
    assert reply.usage is not None and reply.usage.prompt_tokens == len(PROMPT)  # the prompt once
    assert after["prefill"]["prefills"] - before["prefill"]["prefills"] == 1
    assert after["prefill"]["sent"] - before["prefill"]["sent"] == 1
    assert after["decode"]["received"] - before["decode"]["received"] == 1
    assert after["decode"]["prefills"] == before["decode"]["prefills"] == 0
