"""gRPC servicer of `tandem.v1.Styler`: converts protobuf messages to the `Styler` API and back.

Tokenizing, rendering and detokenizing run in a thread pool, never on the event loop. Bad input
becomes INVALID_ARGUMENT with a message naming the field; nothing a client sends takes the
service down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from services.styler.styler import Styler
from tandem.v1 import styler_pb2, styler_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = "tandem.v1.Styler"


class StylerServicer(styler_pb2_grpc.StylerServicer):
    """Serves one `Styler`."""

    def __init__(self, styler: Styler, executor: ThreadPoolExecutor) -> None:
        self.styler = styler
        self.executor = executor

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def Tokenize(
        self, request: styler_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> styler_pb2.TokenizeResponse:
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await self._call(context, lambda: self.styler.tokenize(request.text, add))
        return styler_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: styler_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> styler_pb2.DetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ids = list(request.token_ids)

        def work() -> styler_pb2.DetokenizeResponse:
            text = self.styler.detokenize(ids, skip)
            token_bytes = self.styler.token_bytes(ids) if request.return_token_bytes else []
            return styler_pb2.DetokenizeResponse(text=text, token_bytes=token_bytes)

        return await self._call(context, work)

    async def Info(
        self, request: styler_pb2.StylerInfoRequest, context: grpc.aio.ServicerContext
    ) -> styler_pb2.StylerInfo:
        info = self.styler.info()
        return styler_pb2.StylerInfo(
            model_name=info.model_name,
            vocab_size=info.vocab_size,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            eos_token_ids=list(info.eos_token_ids),
            special_tokens=list(info.special_tokens),
            has_chat_template=info.has_chat_template,
            max_model_len=info.max_model_len,
            tool_parser=info.tool_parser,
            reasoning_parser=info.reasoning_parser,
        )


def add_to_server(servicer: StylerServicer, server: grpc.aio.Server) -> None:
    styler_pb2_grpc.add_StylerServicer_to_server(servicer, server)
