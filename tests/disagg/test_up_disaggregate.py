"""`tandem up --disaggregate` serves the OpenAI API with one prefill and one decode worker."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from stack import UpProcess

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
