"""SMG (Shepherd Model Gateway) in gRPC mode in front of a tandem worker, end to end: its OpenAI
API serves chat and completions through the worker's `vllm.grpc.engine.VllmEngine` service.

Needs the `smg` launcher (`pip install smg`, in any environment): on PATH, or its path in
TANDEM_SMG. Skipped without it. SMG takes `grpc://HOST:PORT`, so when the suite's worker is on a
unix socket this module starts a TCP worker of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.server import wait_for_serving
from tests.e2e.stack import free_port, stop_processes
from tests.protocols.conftest import REPO, worker_args


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def smg_binary() -> str:
    binary = os.environ.get("TANDEM_SMG") or shutil.which("smg")
    if not binary:
        pytest.skip("smg is not installed (pip install smg; TANDEM_SMG=/path/to/smg)")
    return binary


@pytest.fixture(scope="module")
def tcp_address(smg_binary: str, address: str, stories_dir: Path) -> Iterator[str]:
    """The suite's engine when it is on TCP, else a tandem worker of this module's on TCP."""
    if not address.startswith("unix:"):
        yield address
        return
    tcp = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "worker", *worker_args(stories_dir, tcp)], cwd=REPO, env=env
    )
    try:
        asyncio.run(wait_for_serving(tcp, timeout_s=60))
        yield tcp
    finally:
        stop_processes([proc])


@pytest.fixture(scope="module")
def smg_url(smg_binary: str, tcp_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary, address = smg_binary, tcp_address
    port, metrics_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("smg") / "smg.log", "wb")  # noqa: SIM115 - lives with the process
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [
        binary,
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(metrics_port),
    ]
    argv += ["--worker-urls", f"grpc://{address}", "--backend", "vllm"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once it has the worker's tokenizer (GetTokenizer / the model path)
            assert proc.poll() is None, Path(log.name).read_text(errors="replace")[-3000:]
            try:
                status, _ = _post(
                    f"{url}/v1/completions", {"model": "stories260K", "prompt": "a", "max_tokens": 1}
                )
            except OSError:
                status = 0
            if status == 200:
                break
            assert time.monotonic() < deadline, Path(log.name).read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        stop_processes([proc])
        log.close()


def test_smg_serves_chat_through_a_tandem_worker(smg_url: str) -> None:
    body = {
        "model": "stories260K",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 30,
        "temperature": 0,
    }
    status, reply = _post(f"{smg_url}/v1/chat/completions", body)
    assert status == 200 and reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 30
    status, stopped = _post(f"{smg_url}/v1/chat/completions", {**body, "stop": ["friend"]})
    full = reply["choices"][0]["message"]["content"]
    if "friend" in full:
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["choices"][0]["message"]["content"] == full[: full.index("friend")]
