"""Graceful drain: a rolling restart of one of two workers at a time under load fails no request;
SIGTERM on the gateway turns /health to 503, refuses new requests, lets the in-flight stream
finish, and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from .load import Load
from .rstack import ReliabilityStack, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _workers_in_rotation(url: str) -> dict[str, bool]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return dict(json.loads(reply.read())["worker"])
    except OSError as exc:
        body = getattr(exc, "read", lambda: b"{}")()
        return dict(json.loads(body or b"{}").get("worker", {}))


async def test_rolling_restart_under_load_fails_nothing(stories_dir: Path, tmp_path: Path) -> None:
    stack = ReliabilityStack(tmp_path, stories_dir, num_workers=2, worker_args=["--drain-timeout", "20"])
    try:
        stack.start()
        load = Load(stack.url, concurrency=3)
        load.start()
        await load.served(since=0.0)  # the load runs before the first restart
        for i in range(2):
            name = f"worker-{i}"
            proc = stack.procs[name]
            proc.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(proc.wait, 30)
            assert status == 0, stack.log_tail(name)
            assert "draining" in stack.log_tail(name, 200) or "stopped" in stack.log_tail(name, 200)
            stack.start_worker(i)
            deadline = time.monotonic() + 90
            while not all((await asyncio.to_thread(_workers_in_rotation, stack.url)).values()):
                assert time.monotonic() < deadline, stack.log_tail(name)
                await asyncio.sleep(0.2)
            await load.served(since=time.monotonic())  # both workers serve before the next restart
        await load.stop()
    finally:
        stack.stop()
    kinds = [o.kind for o in load.outcomes]
    print(f"\nrolling restart: {len(kinds)} streams, {kinds.count('ok')} ok")
    failed = [o for o in load.outcomes if o.kind != "ok"]
    # (the gateway's and workers' logs name the cause of a failed stream)
    logs = "\n".join(f"--- {n}\n{stack.log_tail(n, 40)}" for n in ("gateway", "worker-0", "worker-1"))
    assert kinds and not failed, f"{failed}\n{logs}"


async def test_gateway_drains_on_sigterm(limited_stack: ReliabilityStack) -> None:
    """A second gateway on the shared stack: SIGTERM while a long stream runs."""
    stack = limited_stack
    port = free_port()
    proc = stack.start_gateway("gateway-drain", port, ["--drain-timeout", "30"])
    try:
        stack.wait_healthy(port, 60)
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json=body) as reply:
                assert reply.status == 200
                first = await reply.content.readline()
                assert first.startswith(b"data: ")
                proc.send_signal(signal.SIGTERM)
                # The signal is handled asynchronously: wait for /health to say so, not for a time.
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    async with session.get(url + "/health") as health:
                        if health.status == 503:
                            assert (await health.json())["status"] == "draining"
                            break
                    assert asyncio.get_running_loop().time() < deadline, "the gateway never drained"
                    await asyncio.sleep(0.05)
                async with session.post(
                    url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}
                ) as new:
                    assert new.status == 503 and new.headers["Retry-After"] == "1"
                await asyncio.sleep(0.5)  # the in-flight stream keeps streaming during the drain
                rest = await reply.read()
            text = first.decode() + rest.decode()
            assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
            chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks if c["choices"]) > 1
        assert await asyncio.to_thread(proc.wait, 30) == 0, stack.log_tail("gateway-drain")
    finally:
        if proc.poll() is None:
            proc.kill()
        # The shared stack's health check treats any exited process as a failure: forget this one.
        stack.procs.pop("gateway-drain", None)
