"""`tandem styler --model DIR`: the tokenizer / chat-template service over gRPC."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from services.common import gc_heap
from services.common.config import parse_config
from services.common.logging import setup_logging
from services.common.server import GrpcServer, run
from services.common.telemetry import setup_tracing, shutdown_tracing
from services.styler.config import StylerConfig
from services.styler.model_files import ModelFilesError
from services.styler.rpc import SERVICE_NAME, StylerServicer, add_to_server
from services.styler.styler import Styler, StylerOptions

log = logging.getLogger("tandem.styler")


def options_from_config(config: StylerConfig) -> StylerOptions:
    return StylerOptions(
        model=config.model,
        model_name=config.model_name,
        tool_parser=config.tool_parser,
        reasoning_parser=config.reasoning_parser,
        chat_template=config.chat_template,
        render_timeout_s=config.render_timeout,
        max_prompt_chars=config.max_prompt_chars,
        render_memory_mb=config.render_memory_mb,
        render_processes=config.render_processes,
    )


async def serve(config: StylerConfig, styler: Styler) -> None:
    # GrpcServer adds the tracing and rpc-metrics interceptors and serves --metrics-port itself.
    server = GrpcServer.from_config(config)
    with ThreadPoolExecutor(max_workers=config.num_threads, thread_name_prefix="styler") as executor:
        servicer = StylerServicer(styler, executor)
        add_to_server(servicer, server.server)
        server.add_service_name(SERVICE_NAME)
        server.on_drain(servicer.drain)
        await server.start()
        gc_heap.freeze_startup_heap()  # ready: what start-up left stays out of every collection
        await server.serve_until_signal()


def main(argv: list[str], prog: str = "tandem styler") -> int:
    config = parse_config(StylerConfig, argv, prog)
    setup_logging(config.log_level, config.log_format, service="tandem.styler")
    setup_tracing("tandem-styler")  # from the OTEL_* environment; a no-op without it
    try:
        styler = Styler.load(options_from_config(config))
    except (ModelFilesError, ValueError) as exc:
        log.error("cannot load the model: %s", exc)
        return 1
    info = styler.info()
    log.info(
        "loaded %s: vocab %d, chat template %s, tool parser %s, reasoning parser %s",
        info.model_name,
        info.vocab_size,
        "yes" if info.has_chat_template else "no",
        info.tool_parser or "none",
        info.reasoning_parser or "none",
    )
    try:
        return run(lambda: serve(config, styler))
    finally:
        styler.close()
        shutdown_tracing()
