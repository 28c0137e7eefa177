"""`tandem up --tensor-parallel-size 2` serves the OpenAI API; its greedy text is the T = 1 model's;
kill -9 of rank 1 under load takes the worker down, no stream hangs, `up` restarts the group and
later requests all succeed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from tests.e2e.stack import UpProcess, child_pids, children_by_role, http_status
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

        # kill -9 of rank 1 while streams run: each ends (tokens or an error), none hangs
        ended: list[str] = []

        def stream(i: int) -> None:
            try:
                for _ in oai.with_options(timeout=60).completions.create(
                    model="stories260K", prompt=prompt, max_tokens=200, temperature=0, stream=True
                ):
                    pass
                ended.append("done")
            except Exception as exc:
                ended.append(type(exc).__name__)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        (rank1,) = child_pids(worker)
        os.kill(rank1, signal.SIGKILL)
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads) and len(ended) == 4, ended
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = children_by_role(up.process.pid).get("worker")
            if now not in (None, worker) and http_status(up.url + "/health") == 200 and child_pids(now):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the worker group was not restarted:\n" + up.output()[-3000:])
        assert "restarting" in up.output()
        for _ in range(3):
            again = oai.with_options(timeout=60).completions.create(
                model="stories260K", prompt=prompt, max_tokens=16, temperature=0
            )
            assert again.choices[0].text == whole.choices[0].text
    finally:
        assert up.stop() == 0
