"""gRPC servicer of `tandem.v1.Styler`: converts protobuf messages to the `Styler` API and back.

Tokenizing and rendering run in a thread pool, never on the event loop; so does detokenizing,
except the small deltas of streams, which cost less than the hop (detokenize_work.py). Bad input
becomes INVALID_ARGUMENT with a message naming the field; nothing a client sends takes the
service down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from services.common.logging import request_id_var
from services.styler.chat_template import RenderInput, TemplateRenderError
from services.styler.detokenize_mux import AnswerWriter, DetokenizeMux, SessionAnswer, SessionMessage
from services.styler.detokenize_work import add_deltas
from services.styler.messages import (
    check_text,
    message_dict,
    parse_arguments,
    parse_json_field,
    tool_call_dict,
)
from services.styler.parsers.tool_grammar import ToolGrammarSpec
from services.styler.stream import DetokenizeSession, StreamDelta, StreamOptions
from services.styler.styler import Styler
from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = "tandem.v1.Styler"


class StylerServicer(styler_pb2_grpc.StylerServicer):
    """Serves one `Styler`."""

    def __init__(self, styler: Styler, executor: ThreadPoolExecutor) -> None:
        self.styler = styler
        self.executor = executor
        self._muxes: set[DetokenizeMux] = set()
        self._draining = False

    def num_detokenize_streams(self) -> int:
        """DetokenizeMany streams open."""
        return len(self._muxes)

    def num_detokenize_sessions(self) -> int:
        """Sessions open on this servicer's DetokenizeMany streams."""
        return sum(mux.num_sessions for mux in self._muxes)

    async def drain(self) -> None:
        """The server drains: DetokenizeMany streams refuse new sessions and end after their last."""
        self._draining = True
        for mux in self._muxes:
            mux.drain()

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        except TemplateRenderError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.describe())
            raise  # unreachable: abort raises
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def Render(
        self, request: styler_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> styler_pb2.RenderResponse:
        def work() -> styler_pb2.RenderResponse:
            render = render_input(request)
            rendered = self.styler.render(render)
            grammar = ""
            if request.HasField("tool_grammar"):
                options = request.tool_grammar
                spec = ToolGrammarSpec(
                    tools=render.tools or [],
                    parallel=options.parallel_tool_calls,
                    answer_schema=options.answer_json_schema,
                )
                grammar = self.styler.tool_grammar(spec)
            return styler_pb2.RenderResponse(
                tool_grammar=grammar,
                prompt=rendered.prompt,
                token_ids=rendered.token_ids,
                images=[
                    common_pb2.ImageInput(
                        hash=image.pixels.hash,
                        offset=image.offset,
                        length=image.length,
                        pixel_values=image.pixels.array.astype("<f4").tobytes(),
                        shape=list(image.pixels.array.shape),
                        dtype="float32",
                        grid_thw=list(image.pixels.grid_thw),
                    )
                    for image in rendered.images
                ],
            )

        return await self._call(context, work)

    async def DetokenizeStream(
        self,
        request_iterator: AsyncIterator[styler_pb2.DetokenizeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[styler_pb2.DetokenizeStreamResponse]:
        session: DetokenizeSession | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("kind")
            if session is None:
                if kind != "start":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `start`")
                options = stream_options(message.start)
                request_id_var.set(options.request_id or "-")
                try:
                    session = self.styler.open_stream(options)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                continue
            if kind != "deltas":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "`start` may only be sent once")
            deltas = [(d.index, list(d.token_ids), d.finished) for d in message.deltas.deltas]
            try:
                out = await add_deltas(session, deltas, self.executor)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            reply = [text_delta_proto(d) for d in out if not d.is_empty()]
            if reply:
                yield styler_pb2.DetokenizeStreamResponse(deltas=reply)

    async def DetokenizeMany(
        self,
        request_iterator: AsyncIterator[styler_pb2.DetokenizeManyRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        async def write(answers: list[SessionAnswer]) -> None:
            await context.write(
                styler_pb2.DetokenizeManyResponse(responses=[session_answer_proto(a) for a in answers])
            )

        writer = AnswerWriter(write)
        over = asyncio.Event()  # the caller closed the stream, or it drained
        mux = DetokenizeMux(self.styler, self.executor, writer, over.set)
        self._muxes.add(mux)
        if self._draining:
            mux.drain()

        async def read() -> None:
            async for message in request_iterator:
                mux.handle([session_message(r) for r in message.requests])
                await writer.flush()

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: over.set())
        try:
            await over.wait()
            await writer.wait_idle()  # the last answers (a drained stream's last end) go out first
            if reader.done():
                reader.result()  # the caller's stream broke: end with its error
        finally:
            reader.cancel()
            mux.close()
            self._muxes.discard(mux)

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
            max_token_bytes=info.max_token_bytes,
        )


def add_to_server(servicer: StylerServicer, server: grpc.aio.Server) -> None:
    styler_pb2_grpc.add_StylerServicer_to_server(servicer, server)


def render_input(request: styler_pb2.RenderRequest) -> RenderInput:
    messages = []
    for i, m in enumerate(request.messages):
        which = m.WhichOneof("content")
        content: str | list[dict[str, Any]] | None
        if which == "text":
            content = m.text
        elif which == "parts":
            content = [content_part(p) for p in m.parts.parts]
        else:
            content = None
        extra = parse_json_field(m.extra_json, f"messages[{i}].extra_json", dict)
        for j, c in enumerate(m.tool_calls):
            check_text(parse_arguments(c.arguments), f"messages[{i}].tool_calls[{j}].arguments")
        messages.append(
            message_dict(
                m.role,
                content,
                name=m.name,
                tool_calls=[tool_call_dict(c.id, c.name, c.arguments, c.type) for c in m.tool_calls],
                tool_call_id=m.tool_call_id,
                reasoning_content=m.reasoning_content if m.HasField("reasoning_content") else None,
                extra=extra,
            )
        )
    return RenderInput(
        messages=messages,
        tools=parse_json_field(request.tools_json, "tools_json", list),
        documents=parse_json_field(request.documents_json, "documents_json", list),
        add_generation_prompt=(
            request.add_generation_prompt
            if request.HasField("add_generation_prompt")
            else not request.continue_final_message
        ),
        continue_final_message=request.continue_final_message,
        chat_template=request.chat_template if request.HasField("chat_template") else None,
        template_kwargs=parse_json_field(request.chat_template_kwargs_json, "chat_template_kwargs_json", dict)
        or {},
    )


def content_part(part: common_pb2.ContentPart) -> dict[str, Any]:
    if part.type == "image_url":
        return {
            "type": "image_url",
            "image_url": {"url": part.image_url.url, "detail": part.image_url.detail},
        }
    return {"type": part.type, "text": part.text}


def stream_options(start: styler_pb2.DetokenizeStreamStart) -> StreamOptions:
    return StreamOptions(
        request_id=start.request_id,
        prompt_token_ids=tuple(start.prompt_token_ids),
        skip_special_tokens=start.skip_special_tokens if start.HasField("skip_special_tokens") else True,
        stop=tuple(start.stop),
        include_stop_str_in_output=start.include_stop_str_in_output,
        tool_parser=start.tool_parser,
        reasoning_parser=start.reasoning_parser,
        num_choices=start.num_choices or 1,
        first_choice_index=start.first_choice_index,
        prompt_opens_reasoning=start.prompt_opens_reasoning,
    )


def session_message(request: styler_pb2.SessionRequest) -> SessionMessage:
    kind = request.WhichOneof("kind") or ""
    if kind == "start":
        return SessionMessage(request.session_id, kind, start=stream_options(request.start))
    if kind == "deltas":
        deltas = [(d.index, list(d.token_ids), d.finished) for d in request.deltas.deltas]
        return SessionMessage(request.session_id, kind, deltas=deltas)
    return SessionMessage(request.session_id, kind)


def session_answer_proto(answer: SessionAnswer) -> styler_pb2.SessionResponse:
    out = styler_pb2.SessionResponse(
        session_id=answer.session_id, deltas=[text_delta_proto(d) for d in answer.deltas]
    )
    if answer.end is not None:
        out.end.code = answer.end.code.value[0]
        out.end.message = answer.end.message
    return out


def text_delta_proto(delta: StreamDelta) -> styler_pb2.TextDelta:
    return styler_pb2.TextDelta(
        index=delta.index,
        text=delta.text,
        reasoning_text=delta.reasoning_text,
        tool_calls=[
            common_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in delta.tool_calls
        ],
        stopped=delta.stopped,
        matched_stop=delta.matched_stop,
        finished=delta.finished,
        num_tokens=delta.num_tokens,
    )
