"""Start the real stack (styler, workers, gateway) as processes on unix sockets, for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.e2e.stack import free_port, kill_process, stop_processes

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TANDEM_API_KEY", None)
    return env


class Stack:
    """styler + N workers + gateway, started in a run directory; `stop()` ends them all."""

    def __init__(
        self,
        run_dir: Path,
        model: Path,
        num_workers: int = 1,
        gateway_args: Sequence[str] = (),
        worker_args: Sequence[str] = (),
    ) -> None:
        self.run_dir = run_dir
        self.model = model
        self.styler_address = f"unix:{run_dir}/styler.sock"
        self.worker_addresses = [f"unix:{run_dir}/worker-{i}.sock" for i in range(num_workers)]
        self.gateway_args = list(gateway_args)
        self.worker_args = list(worker_args)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.grpc_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=REPO,
        )
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float = 180.0) -> Stack:
        return self.launch().wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 180.0) -> Stack:
        for attempt in range(3):
            try:
                self.wait_healthy(self.port, timeout_s, all_workers=True)
                return self
            except RuntimeError as exc:
                # free_port() releases the port it found; another process (an outgoing connection's
                # ephemeral port, say) may take it before the gateway binds: new ports, once more
                if attempt == 2 or (
                    "Failed to bind" not in str(exc) and "address already in use" not in str(exc)
                ):
                    raise
                stop_processes([self.procs.pop("gateway")])
                self.port, self.grpc_port = free_port(), free_port()
                self.start_gateway(
                    "gateway", self.port, [*self.gateway_args, "--grpc-port", str(self.grpc_port)]
                )
        return self

    def launch(self) -> Stack:
        """Spawn the processes without waiting for them (`wait_ready`): a test can prepare
        something else, or launch another stack, while they start."""
        self._spawn("styler", ["styler", "--model", str(self.model), "--address", self.styler_address])
        for i, address in enumerate(self.worker_addresses):
            self._spawn(
                f"worker-{i}",
                [
                    "worker",
                    "--model",
                    str(self.model),
                    "--address",
                    address,
                    "--device",
                    "cpu",
                    *self.worker_args,
                ],
            )
        self.port, self.grpc_port = free_port(), free_port()
        self.start_gateway("gateway", self.port, [*self.gateway_args, "--grpc-port", str(self.grpc_port)])
        return self

    def start_gateway(
        self,
        name: str,
        port: int,
        args: Sequence[str] = (),
        styler: Sequence[str] | None = None,
        workers: Sequence[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        argv = ["gateway", "--port", str(port), "--health-interval", "0.2"]
        for address in self.styler_address_list() if styler is None else styler:
            argv += ["--styler", address]
        for address in self.worker_addresses if workers is None else workers:
            argv += ["--worker", address]
        return self._spawn(name, [*argv, *args])

    @contextlib.contextmanager
    def extra_gateway(
        self,
        name: str,
        args: Sequence[str] = (),
        want: int = 200,
        workers: Sequence[str] | None = None,
        port: int = 0,
    ) -> Iterator[str]:
        """A further gateway with its own flags on this stack's styler and workers (a gateway
        starts in a second; a whole stack takes several): yields its URL once /health answers
        `want`, then stops it (SIGTERM) and forgets it (`wait_healthy` fails on exited processes)."""
        port = port or free_port()
        self.start_gateway(name, port, args, workers=workers)
        try:
            self.wait_healthy(port, 120, want=want)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_processes([self.procs.pop(name)])

    @contextlib.contextmanager
    def extra_worker(self, name: str, model: Path, args: Sequence[str] = ()) -> Iterator[str]:
        """A further worker process (`name` starts with "worker") on its own socket, in no gateway's
        rotation until one is started with it: yields its address, then stops it."""
        address = f"unix:{self.run_dir}/{name}.sock"
        self._spawn(name, ["worker", "--model", str(model), "--address", address, "--device", "cpu", *args])
        try:
            yield address
        finally:
            stop_processes([self.procs.pop(name)])

    def styler_address_list(self) -> list[str]:
        return [self.styler_address]

    def wait_healthy(self, port: int, timeout_s: float, want: int = 200, all_workers: bool = False) -> None:
        deadline = time.monotonic() + timeout_s
        status = 0
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and not name.startswith("worker"):
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    status = reply.status
                    if all_workers and not all(json.loads(reply.read())["worker"].values()):
                        status = 0
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 0
            if status == want:
                return
            time.sleep(0.2)
        tails = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.procs)
        raise TimeoutError(f"gateway on port {port} not healthy ({status}) after {timeout_s}s\n{tails}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.run_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str) -> None:
        kill_process(self.procs[name])

    def restart_gateway(self, timeout_s: float = 120.0) -> None:
        """Stops the gateway (SIGTERM, drained) and starts it again on the same ports."""
        stop_processes([self.procs.pop("gateway")])
        self.start_gateway("gateway", self.port, [*self.gateway_args, "--grpc-port", str(self.grpc_port)])
        self.wait_healthy(self.port, timeout_s, all_workers=True)

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
