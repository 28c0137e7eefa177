"""`tandem worker`: load the model, size the KV cache, serve tandem.v1.Worker over gRPC."""

from __future__ import annotations

import logging
import sys

from services.common import gc_heap, switches
from services.common.config import parse_config
from services.common.large_buffers import keep_large_buffers
from services.common.logging import setup_logging
from services.common.server import GrpcServer, run
from services.common.telemetry import setup_tracing
from services.worker.config import WorkerConfig

log = logging.getLogger("tandem.worker")


def main(argv: list[str], prog: str = "tandem worker") -> int:
    if "--list-switches" in argv:  # the environment switches (services/common/switches.py), then exit
        print(switches.table())
        return 0
    config = parse_config(WorkerConfig, argv, prog)
    try:  # read every switch now: a bad value is one line here, not a traceback from a kernel import
        switches.read_all()
    except switches.SwitchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if switches.GIL_SWITCH_INTERVAL.value > 0:
        sys.setswitchinterval(switches.GIL_SWITCH_INTERVAL.value)
    if switches.KEEP_LARGE_BUFFERS.value:
        keep_large_buffers(arena_max=1)
    setup_logging(config.log_level, config.log_format, "tandem.worker")
    setup_tracing("tandem-worker")  # from the OTEL_* environment; a no-op without it
    # torch is imported only now, so `tandem worker --help` and option errors stay instant
    from services.worker import openengine_rpc, smg_rpc
    from services.worker.async_engine import AsyncEngine
    from services.worker.engine import Engine
    from services.worker.model_config import ModelConfigError
    from services.worker.ray_executor import RayRanks
    from services.worker.rpc import SERVICE_NAME, add_to_server
    from services.worker.tp_group import RankProcesses
    from services.worker.tp_launch import follow_until_down, start_group

    if config.role == "encode":
        return _serve_encoder(config, prog)
    group: RankProcesses | RayRanks | None = None
    try:
        if config.world_size > 1:
            member = start_group(config, argv)
            group = member.local
            if not member.driver:  # ranks 1..T-1 run rank 0's commands until the group goes down
                return follow_until_down(config, group)
        engine = Engine(config)
    except ModelConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    async_engine = AsyncEngine(engine)

    async def serve() -> None:
        server = GrpcServer.from_config(config)  # drain, TLS and --metrics-port from the config
        servicer = add_to_server(server.server, async_engine)
        server.add_service_name(SERVICE_NAME)
        # OpenEngine (ai-dynamo/openengine) on the same port: docs/protocols.md
        openengine = openengine_rpc.add_to_server(server.server, servicer, config.address)
        server.add_service_name(openengine_rpc.INFERENCE_SERVICE)
        server.add_service_name(openengine_rpc.CONTROL_SERVICE)
        smg = smg_rpc.add_to_server(server.server, servicer)  # SMG's vllm_engine.proto, same port
        server.add_service_name(smg_rpc.SERVICE_NAME)

        async def mark_draining() -> None:
            openengine.draining = smg.draining = True

        server.on_drain(mark_draining)
        server.on_drain(servicer.drain)  # GenerateMany streams end after their last session
        async_engine.start()
        await server.start()
        servicer.advertise_address = servicer.advertise_address or server.bound_address
        await servicer.start_wire_helpers(server.bound_address)
        gc_heap.freeze_startup_heap()  # ready: the model and torch stay out of every collection
        log.info(
            "worker serving %s (%s, %s, %s) on %s",
            engine.served_model_name,
            engine.model_config.architecture,
            engine.dtype,
            engine.device,
            server.bound_address,
        )
        try:
            await server.serve_until_signal()
        finally:
            await servicer.close()
            async_engine.stop()
            if group is not None:
                group.terminate()

    return run(serve)


def _serve_encoder(config: WorkerConfig, prog: str) -> int:
    """`--role encode`: only the vision encoder, serving Encode (services/worker/encoder.py)."""
    from pathlib import Path

    from services.worker import encode_rpc
    from services.worker.encoder import VisionEncoder
    from services.worker.model_config import ModelConfigError

    try:
        encoder = VisionEncoder(config)
    except ModelConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        server = GrpcServer.from_config(config)
        name = config.served_model_name or Path(config.model).resolve().name
        servicer = encode_rpc.add_to_server(server.server, encoder, name)
        server.add_service_name(encode_rpc.SERVICE_NAME)
        await server.start()
        gc_heap.freeze_startup_heap()
        log.info("encode worker serving %s on %s", name, server.bound_address)
        try:
            await server.serve_until_signal()
        finally:
            servicer.close()

    return run(serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "tandem worker"))
