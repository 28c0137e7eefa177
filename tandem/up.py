"""`tandem up`: the whole stack on one machine as local child processes.

    styler  ── unix:<run dir>/styler.sock
    worker  ── unix:<run dir>/worker-<i>.sock     (N of them with --workers N)
    gateway ── http://HOST:PORT                   (talks to the others over the unix sockets)

Before starting anything, `up` checks that the gateway's ports are free (a one-line error naming
the port and its flag otherwise) and that the run dir is private (0700) and not in use. Children
start in dependency order; `up` waits until each reports SERVING (gRPC health for the styler and
workers, HTTP `/health` showing this start's instance id for the gateway), then prints the URL.
Every child gets PR_SET_PDEATHSIG, so none outlives `up` even if `up` is killed with SIGKILL. On
SIGTERM / SIGINT `up` stops the gateway first, then the rest (each drains), and exits 0. A child
that dies on its own is restarted with exponential backoff (`--max-restarts` times within
`--restart-window` seconds), each dead child at once; past that `up` stops the rest and exits 1,
printing the child's last log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp

from services.common.config import parse_config
from services.common.logging import setup_logging
from services.common.server import install_event_loop_policy, wait_for_serving
from services.common.tls import TlsFiles

log = logging.getLogger("tandem.up")

DEFAULT_MODEL = "./models/default"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class UpConfig:
    """Start styler, worker(s) and gateway on this machine and serve the OpenAI API."""

    model: str = DEFAULT_MODEL
    """Hugging Face model directory (config.json, *.safetensors, tokenizer files)."""
    host: str = "127.0.0.1"
    """Address the gateway's HTTP server binds to."""
    port: int = 8000
    """Port of the gateway's HTTP server (OpenAI API)."""
    grpc_port: int = 0
    """Port of the gateway's public gRPC Inference API (0 = off)."""
    workers: int = 1
    """Number of unified model workers behind the gateway."""
    disaggregate: bool = False
    """Start one prefill and one decode worker instead of unified workers."""
    encode_workers: int = 0
    """Encode workers to start (an image-in model's vision encoder in its own worker, --role encode); the gateway has each image prompt's images encoded there (docs/multimodal.md). 0: the workers encode their images themselves."""
    device: str = "auto"
    """Device for the workers: auto, cpu, cuda or cuda:N."""
    served_model_name: str = ""
    """Model id clients send and /v1/models lists ("" = the model directory's name); given to the workers and the gateway."""
    api_key: list[str] = field(default_factory=list)
    """Bearer token the gateway accepts (repeat for several); without any, the API is open."""
    max_model_len: int = 0
    """Largest prompt + output length per request, given to every worker (0 = the model's context)."""
    max_num_seqs: int = 0
    """Largest number of sequences a worker computes in one step (0 = the worker's default)."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """KV cache element type of the workers: auto = the model dtype; fp8 = float8 e4m3."""
    quantization: Literal["none", "int8", "fp8", "int4"] = "none"
    """Quantize a full-precision checkpoint's weights at load time in every worker (int8: W8A16; fp8: e4m3, W8A8 where the GPU has FP8; int4: W4A16 group 128); pre-quantized checkpoints need no flag (docs/quantization.md)."""
    task: Literal["generate", "embed"] = "generate"
    """What the workers serve: generate (chat, completions, ...) or embed (/v1/embeddings from a decoder embedding model such as Qwen3-Embedding; docs/worker.md)."""
    distributed_executor_backend: Literal["mp", "ray"] = "mp"
    """How each worker starts its other ranks: mp = its own child processes; ray = Ray actors on --ray-address (else a local Ray cluster per worker; docs/parallel.md)."""
    ray_address: str = ""
    """The Ray cluster the workers place their ranks on (--distributed-executor-backend ray)."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The workers' collectives: auto = NCCL on CUDA, gloo on the CPU; gloo on CUDA lets one worker's ranks share a GPU (agreement runs on one GPU; docs/parallel.md)."""
    tensor_parallel_size: int = 1
    """Ranks each worker's model is split over (each worker starts its own ranks; docs/parallel.md)."""
    prefill_tensor_parallel_size: int = 0
    """--disaggregate: the prefill worker's tensor-parallel size (0 = --tensor-parallel-size); it may differ from the decode worker's (KV re-sharded on fetch, docs/disaggregation.md)."""
    decode_tensor_parallel_size: int = 0
    """--disaggregate: the decode worker's tensor-parallel size (0 = --tensor-parallel-size)."""
    speculative: Literal["off", "prompt-lookup", "draft-model", "eagle"] = "off"
    """Speculative decoding in every worker: prompt-lookup (n-gram proposals), draft-model (--speculative-model) or eagle (an EAGLE / EAGLE-3 head in --speculative-model); docs/speculative.md."""
    speculative_model: str = ""
    """Draft model directory for every worker (same tokenizer and vocabulary as the model), or the EAGLE head with --speculative eagle."""
    num_speculative_tokens: int = 0
    """Most tokens drafted per sequence and step (0 = the worker's default, 4)."""
    lora_modules: list[str] = field(default_factory=list)
    """LoRA adapters every worker serves from the start, as NAME=DIR (PEFT directories; repeat for several); requests select one with `model` (docs/lora.md)."""
    enable_lora: bool = False
    """Let the workers serve LoRA adapters loaded at run time (POST /v1/load_lora_adapter) even without --lora-modules."""
    max_loras: int = 0
    """Adapters a worker applies in one step (device slots; 0 = the worker's default, 4 with LoRA on)."""
    max_lora_rank: int = 0
    """Largest adapter rank the workers accept (0 = the worker's default, 16)."""
    worker_args: str = ""
    """Extra options passed to every worker, as one shell-quoted string (e.g. "--max-num-seqs 64")."""
    styler_args: str = ""
    """Extra options passed to the styler, as one shell-quoted string."""
    gateway_args: str = ""
    """Extra options passed to the gateway, as one shell-quoted string (e.g. "--api-key sk-1")."""
    strict_tools: Literal["auto", "always", "never"] = "auto"
    """The gateway's --strict-tools: grammar-enforced tool calls in tool_choice "auto" (auto = for functions with "strict": true; always; never)."""
    routing: Literal["exact", "affinity"] = "exact"
    """The gateway's --routing: exact = by the workers' prefix caches as their KV events tell; affinity = least load with the prefix-affinity guess alone."""
    run_dir: str = ""
    """Folder for the unix sockets between the services ("" = a new temporary folder)."""
    startup_timeout: float = 300.0
    """Seconds each service gets to report SERVING."""
    max_restarts: int = 5
    """Restarts allowed per child within --restart-window before `up` gives up and exits 1."""
    restart_window: float = 60.0
    """Seconds over which --max-restarts is counted."""
    log_level: str = "info"
    """Log level of `up` and its children."""
    tls_cert: str = ""
    """PEM certificate every service presents for mutual TLS between them (with --tls-key, --tls-ca)."""
    tls_key: str = ""
    """PEM private key matching --tls-cert."""
    tls_ca: str = ""
    """PEM CA bundle that signs the services' certificates; with it, plaintext and unknown peers are refused."""
    ssl_certfile: str = ""
    """PEM certificate for HTTPS on the gateway's --port (with --ssl-keyfile)."""
    ssl_keyfile: str = ""
    """PEM private key matching --ssl-certfile."""

    def __post_init__(self) -> None:
        TlsFiles.from_options(self.tls_cert, self.tls_key, self.tls_ca)
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.encode_workers < 0:
            raise ValueError(f"--encode-workers must be >= 0, got {self.encode_workers}")
        if self.encode_workers and self.task == "embed":
            raise ValueError("--encode-workers with --task embed: embed workers take no images")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if not 0 <= self.grpc_port < 65536:
            raise ValueError(f"--grpc-port must be in 0..65535, got {self.grpc_port}")
        if self.max_model_len < 0:
            raise ValueError(f"--max-model-len must be >= 0, got {self.max_model_len}")
        if self.max_num_seqs < 0:
            raise ValueError(f"--max-num-seqs must be >= 0, got {self.max_num_seqs}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.ray_address and self.distributed_executor_backend != "ray":
            raise ValueError("--ray-address is for --distributed-executor-backend ray")
        if self.task == "embed" and self.disaggregate:
            raise ValueError("--task embed with --disaggregate: embeddings are computed by unified workers")
        for name in ("prefill_tensor_parallel_size", "decode_tensor_parallel_size"):
            size = getattr(self, name)
            if size < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1 (0 = --tensor-parallel-size), got {size}"
                )
            if size and not self.disaggregate:
                raise ValueError(f"--{name.replace('_', '-')} is for --disaggregate")
        for name in ("worker_args", "styler_args", "gateway_args"):
            try:
                shlex.split(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"--{name.replace('_', '-')}: {exc}") from None


def exit_reason(status: int) -> str:
    """Why a child ended, for the log: "was killed by SIGKILL" or "exited with status 1"."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def _set_pdeathsig() -> None:
    """In the child, before exec: die with SIGTERM when the parent (`up`) dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One service process `up` supervises."""

    name: str
    argv: list[str]
    ready_check: str  # "grpc:<address>" or "http:<url>" (https URLs too)
    tls: TlsFiles | None = None  # mutual TLS for the gRPC readiness check
    instance_id: str = ""  # what an HTTP readiness check must find in /health's "instance"
    env: dict[str, str] = field(default_factory=dict)  # set over `up`'s environment
    on_gpu: bool = False  # a worker that sizes itself from a GPU's free memory (starts alone)
    process: asyncio.subprocess.Process | None = None
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    restarts: deque[float] = field(default_factory=deque)
    pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_set_pdeathsig,
            env={**os.environ, **self.env} if self.env else None,
        )
        self.pump = asyncio.create_task(self._pump_output())

    async def _pump_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.last_lines.append(line)
            sys.stderr.write(f"[{self.name}] {line}\n")

    async def wait_ready(self, timeout_s: float, started: Sequence[Child] = ()) -> None:
        """Wait until this child reports SERVING; ChildFailed if it, or any `started` child, exits first."""
        assert self.process is not None
        kind, target = self.ready_check.split(":", 1)
        credentials = self.tls.channel_credentials() if self.tls is not None else None
        probe = (
            wait_for_serving(target, timeout_s, credentials=credentials)
            if kind == "grpc"
            else _wait_http_ok(target, timeout_s, self.instance_id)
        )
        probe_task = asyncio.ensure_future(probe)
        exits = {
            asyncio.ensure_future(child.process.wait()): child
            for child in (self, *started)
            if child.process is not None
        }
        try:
            done, _ = await asyncio.wait({probe_task, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when `up` stops (cancels) a start-up in progress
            for task in (probe_task, *exits):
                if not task.done():
                    task.cancel()
        for task, child in exits.items():
            if task in done and not task.cancelled():
                probe_task.cancel()
                await child._drain_pump()
                when = "during start-up" if child is self else f"while {self.name} was starting"
                raise ChildFailed(child, f"exited with status {task.result()} {when}")
        try:
            probe_task.result()
        except TimeoutError as exc:
            raise ChildFailed(self, str(exc)) from None

    async def _drain_pump(self) -> None:
        if self.pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.pump, 2.0)

    async def stop(self, timeout_s: float) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        await self._drain_pump()


class ChildFailed(Exception):
    def __init__(self, child: Child, reason: str) -> None:
        super().__init__(f"{child.name} {reason}")
        self.child = child


async def _wait_http_ok(url: str, timeout_s: float, instance_id: str = "") -> None:
    """Poll `url` until it answers 200 (and, with `instance_id`, reports that instance: a server
    someone else runs on the port is not our gateway being ready)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                # The gateway's own certificate may be self-signed: readiness is all we check here.
                async with session.get(url, ssl=False) as response:
                    if response.status == 200 and not instance_id:
                        return
                    if response.status == 200:
                        body = await response.json(content_type=None)
                        if isinstance(body, dict) and body.get("instance") == instance_id:
                            return
                        last = "HTTP 200 from another server (not this start's gateway)"
                    else:
                        last = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s ({last})")
            await asyncio.sleep(0.1)


def count_gpus() -> int:
    """CUDA devices visible to the workers (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def worker_device_args(config: UpConfig, role: str, num_gpus: int | None = None, index: int = 0) -> list[str]:
    """`--device ...` of one worker. Unified workers (`--workers N`) are spread over the visible
    GPUs, those sharing a GPU each sized to their share of its memory. Disaggregated: prefill on
    cuda:0 and decode on cuda:1 when two GPUs are visible; on one GPU both share it, each sized to
    under half of its memory. Encode workers take --device as given (they keep no KV cache, and
    size nothing from free memory)."""
    if role == "encode":
        return ["--device", config.device]
    if not config.disaggregate:
        if config.device not in ("auto", "cuda") or config.workers == 1:
            return ["--device", config.device]
        num_gpus = count_gpus() if num_gpus is None else num_gpus
        if num_gpus == 0:
            return ["--device", config.device]
        if config.tensor_parallel_size > 1:
            return ["--device", "cuda"]  # its GPUs by CUDA_VISIBLE_DEVICES (unified_gpus)
        sharing = -(-config.workers // num_gpus)  # workers on the busiest GPU
        args = ["--device", f"cuda:{index % num_gpus}"]
        if sharing > 1:
            args += ["--gpu-memory-utilization", f"{0.9 / sharing:.2f}"]
        return args
    if config.device in ("auto", "cuda"):
        num_gpus = count_gpus() if num_gpus is None else num_gpus
        if num_gpus and disaggregated_gpus(config, role, num_gpus):
            return ["--device", "cuda"]  # its GPUs by CUDA_VISIBLE_DEVICES (rank r on cuda:r)
        if num_gpus >= 2:
            return ["--device", f"cuda:{0 if role == 'prefill' else 1}"]
        if num_gpus == 0:
            return ["--device", "cpu"]
        return ["--device", "cuda:0", "--gpu-memory-utilization", "0.45"]
    if config.device.startswith("cuda"):
        return ["--device", config.device, "--gpu-memory-utilization", "0.45"]
    return ["--device", config.device]


def disaggregated_gpus(config: UpConfig, role: str, num_gpus: int) -> str:
    """CUDA_VISIBLE_DEVICES of the prefill / decode worker when either is tensor-parallel on
    CUDA: the prefill worker's ranks on the first GPUs, the decode worker's on the next ones
    ("" = not tensor-parallel: worker_device_args places it). UpError when too few are visible."""
    prefill, decode = tensor_parallel_size(config, "prefill"), tensor_parallel_size(config, "decode")
    if prefill == decode == 1:
        return ""
    if num_gpus < prefill + decode:
        raise UpError(
            f"--disaggregate with a prefill worker of {prefill} rank(s) and a decode worker of {decode} "
            f"needs {prefill + decode} GPUs (one per rank), {num_gpus} visible"
        )
    first = 0 if role == "prefill" else prefill
    return ",".join(_visible_ids(num_gpus)[first : first + (prefill if role == "prefill" else decode)])


def unified_gpus(config: UpConfig, index: int, num_gpus: int) -> str:
    """CUDA_VISIBLE_DEVICES of unified worker `index` when several tensor-parallel workers share
    the host (`--workers N --tensor-parallel-size T` on CUDA): worker i's ranks on GPUs [i*T,
    (i+1)*T) ("" = one worker, or not tensor-parallel: worker_device_args places it). UpError
    when fewer than N x T GPUs are visible."""
    t = config.tensor_parallel_size
    if config.workers == 1 or t == 1:
        return ""
    if num_gpus < config.workers * t:
        raise UpError(
            f"--workers {config.workers} with --tensor-parallel-size {t} needs {config.workers * t} GPUs "
            f"(one per rank), {num_gpus} visible"
        )
    return ",".join(_visible_ids(num_gpus)[index * t : (index + 1) * t])


def _visible_ids(num_gpus: int) -> list[str]:
    """The ids to name the visible GPUs by in a child's CUDA_VISIBLE_DEVICES (`up`'s own, if set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return [
        visible[g].strip() if len(visible) > g and visible[g].strip() else str(g) for g in range(num_gpus)
    ]


def forwarded_worker_args(config: UpConfig, role: str = "unified") -> list[str]:
    """`vllm serve`-style options of `up` that belong to every worker of `role` (only those set)."""
    args: list[str] = []
    if config.served_model_name:
        args += ["--served-model-name", config.served_model_name]
    if config.max_model_len:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.max_num_seqs:
        args += ["--max-num-seqs", str(config.max_num_seqs)]
    if config.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", config.kv_cache_dtype]
    if config.quantization != "none":
        args += ["--quantization", config.quantization]
    if config.distributed_executor_backend != "mp":
        args += ["--distributed-executor-backend", config.distributed_executor_backend]
    if config.ray_address:
        args += ["--ray-address", config.ray_address]
    if config.distributed_backend != "auto":
        args += ["--distributed-backend", config.distributed_backend]
    if tensor_parallel_size(config, role) > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel_size(config, role))]
    if config.task != "generate":
        args += ["--task", config.task]
    if config.speculative != "off":
        args += ["--speculative", config.speculative]
    if config.speculative_model:
        args += ["--speculative-model", config.speculative_model]
    if config.num_speculative_tokens:
        args += ["--num-speculative-tokens", str(config.num_speculative_tokens)]
    for spec in config.lora_modules:
        args += ["--lora-modules", spec]
    if config.enable_lora:
        args += ["--enable-lora"]
    if config.max_loras:
        args += ["--max-loras", str(config.max_loras)]
    if config.max_lora_rank:
        args += ["--max-lora-rank", str(config.max_lora_rank)]
    return args


def tensor_parallel_size(config: UpConfig, role: str) -> int:
    """A worker's --tensor-parallel-size: the role's own under --disaggregate, when given."""
    own = {"prefill": config.prefill_tensor_parallel_size, "decode": config.decode_tensor_parallel_size}
    return own.get(role, 0) or config.tensor_parallel_size


def forwarded_gateway_args(config: UpConfig) -> list[str]:
    """`vllm serve`-style options of `up` that belong to the gateway (only those set)."""
    args: list[str] = []
    for key in config.api_key:
        args += ["--api-key", key]
    if config.served_model_name:
        args += ["--served-model-name", config.served_model_name]
    if config.strict_tools != "auto":
        args += ["--strict-tools", config.strict_tools]
    if config.routing != "exact":
        args += ["--routing", config.routing]
    return args


def build_children(config: UpConfig, run_dir: Path, instance_id: str = "") -> list[Child]:
    """The child processes in start order (styler, workers, gateway). The gateway reports
    `instance_id` in its /health, so `up`'s readiness check knows it reached its own gateway."""
    tandem = [sys.executable, "-m", "tandem"]
    common = ["--log-level", config.log_level]
    tls = TlsFiles.from_options(config.tls_cert, config.tls_key, config.tls_ca)
    if tls is not None:  # every service serves and calls with the same identity and CA
        common += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    styler_addr = f"unix:{run_dir / 'styler.sock'}"
    children = [
        Child(
            "styler",
            [
                *tandem,
                "styler",
                "--model",
                config.model,
                "--address",
                styler_addr,
                *common,
                *shlex.split(config.styler_args),
            ],
            f"grpc:{styler_addr}",
            tls,
        )
    ]
    roles = ["prefill", "decode"] if config.disaggregate else ["unified"] * config.workers
    roles += ["encode"] * config.encode_workers
    gateway_worker_args: list[str] = []
    for i, role in enumerate(roles):
        if role == "encode":
            name = f"encode-worker-{i - (len(roles) - config.encode_workers)}"
        else:
            name = f"worker-{i}" if role == "unified" else f"{role}-worker"
        address = f"unix:{run_dir / (name + '.sock')}"
        role_args = [] if role == "unified" else ["--role", role]
        several_groups = config.workers > 1 and config.tensor_parallel_size > 1
        placed = config.disaggregate or several_groups  # (their GPUs by CUDA_VISIBLE_DEVICES)
        num_gpus = count_gpus() if placed and config.device in ("auto", "cuda") and role != "encode" else 0
        if not num_gpus:
            gpus = ""
        elif config.disaggregate:
            gpus = disaggregated_gpus(config, role, num_gpus)
        else:
            gpus = unified_gpus(config, i, num_gpus)
        device_args = worker_device_args(config, role, index=i)
        children.append(
            Child(
                name,
                [
                    *tandem,
                    "worker",
                    "--model",
                    config.model,
                    "--address",
                    address,
                    *device_args,
                    *role_args,
                    *forwarded_worker_args(config, role),
                    *common,
                    *shlex.split(config.worker_args),
                ],
                f"grpc:{address}",
                tls,
                env={"CUDA_VISIBLE_DEVICES": gpus} if gpus else {},
                on_gpu=device_args[1] != "cpu",
            )
        )
        flag = {
            "unified": "--worker",
            "prefill": "--prefill-worker",
            "decode": "--decode-worker",
            "encode": "--encode-worker",
        }[role]
        gateway_worker_args += [flag, address]
    url_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    scheme = "https" if config.ssl_certfile else "http"
    https_args = ["--ssl-certfile", config.ssl_certfile, "--ssl-keyfile", config.ssl_keyfile] * bool(
        config.ssl_certfile
    )
    children.append(
        Child(
            "gateway",
            [
                *tandem,
                "gateway",
                "--host",
                config.host,
                "--port",
                str(config.port),
                "--grpc-port",
                str(config.grpc_port),
                "--styler",
                styler_addr,
                *gateway_worker_args,
                *https_args,
                *forwarded_gateway_args(config),
                *(["--instance-id", instance_id] if instance_id else []),
                *common,
                *shlex.split(config.gateway_args),
            ],
            f"http:{scheme}://{url_host}:{config.port}/health",
            instance_id=instance_id,
        )
    )
    return children


class Supervisor:
    """Starts the children, restarts crashed ones with backoff, stops them all on a signal."""

    def __init__(self, config: UpConfig, children: list[Child]) -> None:
        self.config = config
        self.children = children
        self.stopping = asyncio.Event()

    async def start_all(self) -> None:
        """Start every child; return once all serve, raise ChildFailed as soon as one fails.

        The styler and the workers load side by side (none needs another to start), except
        workers on a GPU, which start one after another: each sizes its KV cache and CUDA graphs
        from the memory its device has free. The gateway starts last, once they all serve, so
        that its start-up checks (which prefill/decode pairs can exchange KV) see every worker."""
        *services, gateway = self.children

        async def one_by_one(children: list[Child]) -> None:
            for child in children:
                await self._start(child)

        gpu_workers = [c for c in services if c.on_gpu]
        await _together([*(self._start(c) for c in services if not c.on_gpu), one_by_one(gpu_workers)])
        await self._start(gateway)

    async def _start(self, child: Child) -> None:
        log.info("starting %s", child.name)
        await child.start()
        started = [c for c in self.children if c is not child and c.process is not None]
        await child.wait_ready(self.config.startup_timeout, started=started)
        log.info("%s is serving", child.name)

    async def stop_all(self) -> None:
        # Gateway first (stop taking requests), then the services behind it, together: each
        # drains its own in-flight work, and none waits for another.
        *services, gateway = self.children
        await gateway.stop(timeout_s=45.0)
        await asyncio.gather(*(child.stop(timeout_s=45.0) for child in services))

    async def supervise(self) -> None:
        """Return when stopping is requested; raise ChildFailed when a child keeps crashing.

        Each child that dies is restarted in a task of its own, so children that died together
        come back together: none waits for another one's readiness."""
        restarting: dict[asyncio.Task[None], Child] = {}
        try:
            while not self.stopping.is_set():
                busy = {c.name for c in restarting.values()}
                waits = {
                    asyncio.ensure_future(c.process.wait()): c
                    for c in self.children
                    if c.process is not None and c.name not in busy
                }
                stop_wait = asyncio.ensure_future(self.stopping.wait())
                done, _ = await asyncio.wait(
                    {*waits, *restarting, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                for wait in (*waits, stop_wait):
                    wait.cancel()
                for finished in [t for t in restarting if t in done]:
                    del restarting[finished]
                    finished.result()  # ChildFailed: it crashed too often
                if self.stopping.is_set():
                    return
                for task, child in waits.items():
                    if task in done and not task.cancelled():
                        restarting[asyncio.create_task(self._restart(child, task.result()))] = child
        finally:
            for pending in restarting:
                pending.cancel()
            await asyncio.gather(*restarting, return_exceptions=True)

    async def _restart(self, child: Child, status: int) -> None:
        await child._drain_pump()
        now = time.monotonic()
        while child.restarts and now - child.restarts[0] > self.config.restart_window:
            child.restarts.popleft()
        if len(child.restarts) >= self.config.max_restarts:
            raise ChildFailed(
                child,
                f"{exit_reason(status)} and was restarted {len(child.restarts)} times"
                f" within {self.config.restart_window:.0f}s; giving up",
            )
        child.restarts.append(now)
        delay = min(0.5 * 2 ** (len(child.restarts) - 1), 10.0)
        log.error(
            "%s %s; restarting in %.1fs (restart %d of %d within %.0fs)",
            child.name,
            exit_reason(status),
            delay,
            len(child.restarts),
            self.config.max_restarts,
            self.config.restart_window,
        )
        for line in list(child.last_lines)[-5:]:
            log.error("  %s| %s", child.name, line)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        if self.stopping.is_set():
            return
        log.info("starting %s again", child.name)
        await child.start()
        try:
            await child.wait_ready(self.config.startup_timeout)
            log.info("%s is serving again", child.name)
        except ChildFailed as exc:
            log.error("%s", exc)


async def _together(steps: Sequence[Awaitable[None]]) -> None:
    """Run `steps` concurrently; the first to fail cancels the others and its error is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # also when `up` stops (cancels) a start-up in progress
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


async def run_up(config: UpConfig) -> int:
    if (
        not (Path(config.model) / "config.json").exists()
        and not (Path(config.model) / "tokenizer.json").exists()
    ):
        print(model_missing_message(config.model), file=sys.stderr)
        return 2
    try:
        check_ports(config)
        run_dir = prepare_run_dir(config.run_dir)
        children = build_children(config, run_dir, instance_id=secrets.token_hex(8))
    except UpError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1
    supervisor = Supervisor(config, children)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stopping.set)
    status = 0
    try:
        start = asyncio.ensure_future(supervisor.start_all())
        stop_wait = asyncio.ensure_future(supervisor.stopping.wait())
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            stop_wait.cancel()
            start.result()
            url_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
            scheme = "https" if config.ssl_certfile else "http"
            print(f"tandem is serving {config.model} at {scheme}://{url_host}:{config.port}/v1", flush=True)
            await supervisor.supervise()
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChildFailed):
                await start
    except ChildFailed as exc:
        status = 1
        print(f"tandem up: {exc}; last log lines of {exc.child.name}:", file=sys.stderr)
        for line in exc.child.last_lines:
            print(f"  | {line}", file=sys.stderr)
    finally:
        await supervisor.stop_all()
        if not config.run_dir:
            for sock in run_dir.glob("*.sock"):
                sock.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
    return status


class UpError(Exception):
    """Something on this machine keeps `up` from starting; the message is one line for the user."""


def bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be listened on (in use, no permission), or None when it can.
    SO_REUSEADDR as the gateway's server sets it: a port in TIME_WAIT is free, a listener is not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None  # the gateway names a bad --host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # e.g. IPv6 off
                    return exc
    return None


def check_ports(config: UpConfig) -> None:
    """UpError naming the port and its flag when the gateway could not listen on it: found before
    any child starts, rather than as a child's traceback after the rest came up."""
    for flag, port in (("--port", config.port), ("--grpc-port", config.grpc_port)):
        if not port:
            continue
        error = bind_error(config.host, port)
        if error is None:
            continue
        where = f"{config.host or '0.0.0.0'}:{port}"
        if error.errno == errno.EADDRINUSE:
            raise UpError(
                f"port {port} is already in use on {config.host or '0.0.0.0'} ({flag}); stop what listens there or pick another {flag}"
            )
        raise UpError(f"cannot listen on {where} ({flag}): {error.strerror}")


def prepare_run_dir(path: str) -> Path:
    """The folder of the services' unix sockets, open to this user only (0700): anyone who can
    reach a socket can call the styler or a worker directly, without an API key."""
    if not path:
        return Path(tempfile.mkdtemp(prefix="tandem-"))  # created 0700
    run_dir = Path(path)
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if run_dir.stat().st_mode & 0o077:
            log.info("--run-dir %s: making it private (chmod 700)", run_dir)
            run_dir.chmod(0o700)
    except OSError as exc:
        raise UpError(
            f"--run-dir {run_dir}: {exc.strerror}; use a private folder or leave --run-dir out"
        ) from None
    for sock in sorted(run_dir.glob("*.sock")):
        if _unix_socket_answers(sock):
            raise UpError(f"--run-dir {run_dir} is in use ({sock.name} answers: another tandem up?)")
    return run_dir


def _unix_socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False  # a stale socket file: the service replaces it
        return True


def model_missing_message(model: str) -> str:
    return (
        f"tandem up: no model at {model!r} (no config.json or tokenizer.json there).\n"
        "Point tandem at a Hugging Face model directory of a supported architecture (Llama, Mistral,\n"
        "Qwen2/2.5, Qwen3) with config.json, *.safetensors and tokenizer files:\n"
        "  tandem up --model /path/to/model      or      export TANDEM_MODEL=/path/to/model\n"
        "For example: huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/default"
    )


def main(argv: Sequence[str] | None = None, prog: str = "tandem up") -> int:
    config = parse_config(UpConfig, argv, prog)
    setup_logging(config.log_level)
    install_event_loop_policy()
    return asyncio.run(run_up(config))


if __name__ == "__main__":
    sys.exit(main())
