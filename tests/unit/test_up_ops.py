"""`tandem up` before it starts anything: the options it forwards, its ports, its run dir, and a
readiness check that must reach its own gateway."""

from __future__ import annotations

import re
import socket
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import GatewayConfig
from services.common.config import parse_config
from services.worker.config import WorkerConfig
from tandem.up import UpConfig, UpError, _wait_http_ok, build_children, check_ports, prepare_run_dir


def test_vllm_serve_options_reach_the_right_children(tmp_path: Path) -> None:
    config = UpConfig(
        model=str(tmp_path),
        workers=2,
        served_model_name="tiny",
        api_key=["sk-a", "sk-b"],
        max_model_len=64,
        max_num_seqs=4,
        kv_cache_dtype="fp8",
        quantization="int8",
        speculative="prompt-lookup",
        num_speculative_tokens=6,
        routing="affinity",
        worker_args="--block-size 32",
    )
    styler, *workers, gateway = build_children(config, tmp_path, instance_id="start-1")
    for worker in workers:
        # parsed by the worker's own options: every forwarded flag exists under that name
        parsed = parse_config(
            WorkerConfig, worker.argv[worker.argv.index("worker") + 1 :], "tandem worker", env={}
        )
        assert (parsed.served_model_name, parsed.max_model_len, parsed.max_num_seqs) == ("tiny", 64, 4)
        assert parsed.kv_cache_dtype == "fp8" and parsed.block_size == 32
        assert parsed.quantization == "int8"
        assert (parsed.speculative_method, parsed.num_speculative_tokens) == ("prompt-lookup", 6)
        assert "--api-key" not in worker.argv
    options = parse_config(
        GatewayConfig, gateway.argv[gateway.argv.index("gateway") + 1 :], "tandem gateway", env={}
    )
    assert options.api_key == ["sk-a", "sk-b"]
    assert options.served_model_name == "tiny" and options.instance_id == "start-1"
    assert options.routing == "affinity"
    assert gateway.instance_id == "start-1"
    assert not {"--api-key", "--max-model-len", "--max-num-seqs", "--kv-cache-dtype", "--quantization"} & set(
        styler.argv
    )


def test_task_embed_reaches_every_worker(tmp_path: Path) -> None:
    styler, *workers, gateway = build_children(
        UpConfig(model=str(tmp_path), workers=2, task="embed"), tmp_path
    )
    for worker in workers:
        parsed = parse_config(
            WorkerConfig, worker.argv[worker.argv.index("worker") + 1 :], "tandem worker", env={}
        )
        assert parsed.task == "embed"
    assert "--task" not in styler.argv and "--task" not in gateway.argv
    _styler, worker, _gateway = build_children(UpConfig(model=str(tmp_path)), tmp_path)
    assert "--task" not in worker.argv  # generate: the worker's default
    with pytest.raises(ValueError, match="--task embed with --disaggregate"):
        UpConfig(model=str(tmp_path), task="embed", disaggregate=True)


def test_defaults_forward_nothing(tmp_path: Path) -> None:
    _styler, worker, gateway = build_children(UpConfig(model=str(tmp_path)), tmp_path)
    for flag in (
        "--served-model-name",
        "--max-model-len",
        "--max-num-seqs",
        "--kv-cache-dtype",
        "--quantization",
        "--speculative",
        "--speculative-model",
        "--num-speculative-tokens",
    ):
        assert flag not in worker.argv
    assert "--api-key" not in gateway.argv and "--instance-id" not in gateway.argv
    assert "--routing" not in gateway.argv


def test_a_busy_port_is_named_with_its_flag() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UpError, match=f"port {port} is already in use on 127.0.0.1 \\(--port\\)"):
            check_ports(UpConfig(port=port))
        with pytest.raises(UpError, match=f"port {port} .*\\(--grpc-port\\)"):
            check_ports(UpConfig(grpc_port=port, port=_free_port()))
    check_ports(UpConfig(port=port))  # closed again: free


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_dir_is_private_and_not_shared_with_a_running_stack(tmp_path: Path) -> None:
    fresh = prepare_run_dir("")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    fresh.rmdir()
    given = tmp_path / "run"
    given.mkdir(mode=0o755)
    given.chmod(0o755)
    assert stat.S_IMODE(prepare_run_dir(str(given)).stat().st_mode) == 0o700
    assert stat.S_IMODE(prepare_run_dir(str(tmp_path / "new" / "run")).stat().st_mode) == 0o700
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(given / "styler.sock"))
        live.listen()
        with pytest.raises(UpError, match=re.escape("is in use (styler.sock answers")):
            prepare_run_dir(str(given))


async def test_readiness_needs_this_starts_gateway() -> None:
    """A server already on the port answers /health 200: that is not our gateway being ready."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": "someone-else"})

    app = web.Application()
    app.router.add_get("/health", health)
    async with TestServer(app) as server:
        url = str(server.make_url("/health"))
        with pytest.raises(TimeoutError, match="another server"):
            await _wait_http_ok(url, 0.3, instance_id="start-1")
        await _wait_http_ok(url, 5, instance_id="someone-else")
