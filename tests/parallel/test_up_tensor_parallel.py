"""`tandem up --tensor-parallel-size 2` serves the OpenAI API; its greedy text is the T = 1 model's."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from tests.e2e.stack import UpProcess, child_pids, children_by_role
from tests.worker.worker_testlib import load_ref

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_up_tensor_parallel_serves_openai(stories_dir: Path) -> None:
    up = UpProcess(
        stories_dir,
        "--tensor-parallel-size",
        "2",
        "--device",
        "cpu",
        "--worker-args",
        "--kv-cache-memory 8MiB --cpu-threads 1",
    )
    try:
        up.wait_healthy(240)
        worker = children_by_role(up.process.pid)["worker"]
        assert len(child_pids(worker)) == 1  # the worker started its rank 1 itself
        oai = OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
        prompt = [1, 403, 407, 261, 378]
        whole = oai.completions.create(
            model="stories260K", prompt=prompt, max_tokens=16, temperature=0, logprobs=1
        )
        expected = load_ref(stories_dir).greedy(prompt, 16)
        tokenizer = Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
        assert whole.choices[0].text == tokenizer.decode(expected)
        streamed = "".join(
            c.choices[0].text
            for c in oai.completions.create(
                model="stories260K", prompt=prompt, max_tokens=16, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == whole.choices[0].text
    finally:
        assert up.stop() == 0
