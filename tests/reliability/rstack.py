"""The real stack for reliability tests: gateway_stack.Stack with extra styler / worker options,
plus helpers that read a process's memory and a worker's load over gRPC."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))

from gateway_stack import Stack, free_port

from tandem.v1 import worker_pb2, worker_pb2_grpc

__all__ = [
    "LIMIT_ARGS",
    "MAX_RUNNING",
    "MAX_WAITING",
    "ReliabilityStack",
    "free_port",
    "kv_blocks_used",
    "kv_blocks_used_once_settled",
    "rss_bytes",
]

# The limited stack's configured capacity and limits (conftest.limited_stack; tests read them here).
MAX_RUNNING = 2
MAX_WAITING = 2
LIMIT_ARGS = [
    "--max-running", str(MAX_RUNNING),
    "--max-waiting", str(MAX_WAITING),
    "--max-prompt-tokens", "200",
    "--max-tokens", "24",
    "--max-logprobs", "5",
    "--max-tools", "4",
    "--max-stop-strings", "4",
    "--max-n", "2",
]  # fmt: skip


class ReliabilityStack(Stack):
    """styler + N workers + gateway; `service_args` go to the styler and every worker."""

    def __init__(
        self,
        run_dir: Path,
        model: Path,
        num_workers: int = 1,
        gateway_args: Sequence[str] = (),
        service_args: Sequence[str] = (),
        worker_args: Sequence[str] = (),
        styler_args: Sequence[str] = (),
    ) -> None:
        super().__init__(run_dir, model, num_workers, gateway_args)
        self.service_args = list(service_args)
        self.worker_args = list(worker_args)
        self.styler_args = list(styler_args)

    def start_worker(self, i: int) -> None:
        address = self.worker_addresses[i]
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
                "--cpu-threads",
                "1",
                *self.service_args,
                *self.worker_args,
            ],
        )

    def launch(self) -> ReliabilityStack:
        self._spawn(
            "styler",
            [
                "styler",
                "--model",
                str(self.model),
                "--address",
                self.styler_address,
                *self.service_args,
                *self.styler_args,
            ],
        )
        for i in range(len(self.worker_addresses)):
            self.start_worker(i)
        self.port, self.grpc_port = free_port(), free_port()
        self.start_gateway("gateway", self.port, [*self.gateway_args, "--grpc-port", str(self.grpc_port)])
        return self

    def start(self, timeout_s: float = 180.0) -> ReliabilityStack:
        self.launch().wait_ready(timeout_s)
        return self


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def kv_blocks_used(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    """The worker's KV blocks held by live requests (cached free blocks do not count)."""
    channel = (
        grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    )
    async with channel:
        load = await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        return int(load.num_kv_blocks_used)


async def kv_blocks_used_once_settled(address: str, timeout_s: float = 5.0) -> int:
    """`kv_blocks_used`, polled until it reaches 0 or `timeout_s` passes (aborted requests free
    their blocks at the worker's next step, not at once)."""
    for _ in range(int(timeout_s / 0.1)):
        used = await kv_blocks_used(address)
        if used == 0:
            return 0
        await asyncio.sleep(0.1)
    return await kv_blocks_used(address)
