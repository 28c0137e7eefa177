"""Real processes for the gateway-level disaggregation tests: a styler, prefill / decode / unified
workers, and gateways in front of them, on unix sockets in one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.stack import free_port, kill_process, stop_processes

REPO = Path(__file__).resolve().parents[2]


class Processes:
    def __init__(self, run_dir: Path, model: Path) -> None:
        self.run_dir = run_dir
        self.model = model
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def address(self, name: str) -> str:
        return f"unix:{self.run_dir / (name + '.sock')}"

    def spawn(self, name: str, args: Sequence[str]) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("TANDEM_API_KEY", None)
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tandem", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    def styler(self, name: str = "styler") -> None:
        self.spawn(name, ["styler", "--model", str(self.model), "--address", self.address(name)])

    def worker(self, name: str, *args: str) -> None:
        self.spawn(
            name,
            [
                "worker",
                "--model",
                str(self.model),
                "--address",
                self.address(name),
                "--device",
                "cpu",
                "--cpu-threads",
                "1",
                "--kv-cache-memory",
                "16MiB",
                "--max-model-len",
                "512",
                *args,
            ],
        )

    def gateway(self, name: str, *args: str) -> str:
        port = free_port()
        self.ports[name] = port
        self.spawn(
            name,
            [
                "gateway",
                "--port",
                str(port),
                "--health-interval",
                "0.2",
                "--styler",
                self.address("styler"),
                *args,
            ],
        )
        return f"http://127.0.0.1:{port}"

    def wait_healthy(self, gateway: str, timeout_s: float = 180) -> dict[str, dict[str, bool]]:
        url = f"http://127.0.0.1:{self.ports[gateway]}/health"
        deadline = time.monotonic() + timeout_s
        body: dict[str, dict[str, bool]] = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    body = json.loads(reply.read())
                    pools = [v for k, v in body.items() if k != "status" and isinstance(v, dict)]
                    if all(all(pool.values()) for pool in pools):
                        return body
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{gateway} not healthy: {body}\n" + "\n".join(self.log(n) for n in self.procs))

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        kill_process(self.procs[name])

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
