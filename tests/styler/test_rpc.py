"""The styler over a real gRPC connection: every rpc, errors as status codes, `tandem styler`."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.common.server import GrpcServer, wait_for_serving
from services.styler.messages import message_dict, tool_call_dict
from services.styler.rpc import SERVICE_NAME, StylerServicer, add_to_server
from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc

from .helpers import REPO, load_styler, needs_shared, reference_tokenizer, shared_dir

QWEN3 = shared_dir() / "tokenizers" / "qwen3"
pytestmark = [needs_shared, pytest.mark.skipif(not QWEN3.is_dir(), reason="needs shared/tokenizers/qwen3")]


@pytest.fixture
async def stub() -> AsyncIterator[styler_pb2_grpc.StylerStub]:
    server = GrpcServer("127.0.0.1:0", grace_s=1.0)
    with ThreadPoolExecutor(2) as executor:
        add_to_server(StylerServicer(load_styler(str(QWEN3)), executor), server.server)
        server.add_service_name(SERVICE_NAME)
        await server.start()
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            yield styler_pb2_grpc.StylerStub(channel)
        await server.stop()


async def test_tokenize_detokenize_info(stub: styler_pb2_grpc.StylerStub) -> None:
    ref = reference_tokenizer(str(QWEN3))
    text = "Hello 世界 👍🏽<|im_end|>"
    reply = await stub.Tokenize(styler_pb2.TokenizeRequest(text=text))
    assert list(reply.token_ids) == ref.encode(text)
    back = await stub.Detokenize(
        styler_pb2.DetokenizeRequest(token_ids=reply.token_ids, return_token_bytes=True)
    )
    assert back.text == ref.decode(reply.token_ids, skip_special_tokens=True)
    assert len(back.token_bytes) == len(reply.token_ids)
    kept = await stub.Detokenize(
        styler_pb2.DetokenizeRequest(token_ids=reply.token_ids, skip_special_tokens=False)
    )
    assert kept.text == text
    info = await stub.Info(styler_pb2.StylerInfoRequest())
    assert info.vocab_size == len(ref) and info.eos_token == ref.eos_token and info.has_chat_template
    assert ref.eos_token_id in info.eos_token_ids
    assert (info.tool_parser, info.reasoning_parser, info.max_model_len) == ("hermes", "qwen3", 131072)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Detokenize(styler_pb2.DetokenizeRequest(token_ids=[10**9]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_render_converts_messages_like_the_reference(stub: styler_pb2_grpc.StylerStub) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    args = '{"city": "Zürich"}'
    request = styler_pb2.RenderRequest(
        messages=[
            common_pb2.ChatMessage(role="system", text="Be brief."),
            common_pb2.ChatMessage(
                role="user",
                parts=common_pb2.ContentParts(parts=[common_pb2.ContentPart(type="text", text="Weather?")]),
            ),
            common_pb2.ChatMessage(
                role="assistant",
                text="",
                reasoning_content="Need a tool.",
                tool_calls=[
                    common_pb2.ToolCall(id="call_1", type="function", name="get_weather", arguments=args)
                ],
            ),
            common_pb2.ChatMessage(
                role="tool", text="sunny", tool_call_id="call_1", extra_json='{"x_note": 1}'
            ),
        ],
        tools_json=json.dumps(tools),
        chat_template_kwargs_json='{"enable_thinking": false}',
    )
    reply = await stub.Render(request)
    messages = [
        message_dict("system", "Be brief."),
        message_dict("user", [{"type": "text", "text": "Weather?"}]),
        message_dict(
            "assistant",
            "",
            tool_calls=[tool_call_dict("call_1", "get_weather", args)],
            reasoning_content="Need a tool.",
        ),
        message_dict("tool", "sunny", tool_call_id="call_1", extra={"x_note": 1}),
    ]
    ref = reference_tokenizer(str(QWEN3))
    messages[1]["content"] = "Weather?"  # Qwen3's template takes string content: text parts are joined
    kwargs = dict(tools=copy.deepcopy(tools), add_generation_prompt=True, enable_thinking=False)
    assert reply.prompt == ref.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)
    assert list(reply.token_ids) == list(
        ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    )
    assert '"city": "Zürich"' in reply.prompt  # arguments went in as a dict (tojson)

    bad = styler_pb2.RenderRequest(
        messages=[common_pb2.ChatMessage(role="user", text="x")], tools_json="{nope"
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Render(bad)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in (
        exc.value.details() or ""
    )
    refuse = styler_pb2.RenderRequest(
        messages=[common_pb2.ChatMessage(role="user", text="x")],
        chat_template="{{ raise_exception('no way') }}",
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Render(refuse)
    assert (
        exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and exc.value.details() == "messages: no way (chat template line 1)"
    )


async def test_detokenize_stream(stub: styler_pb2_grpc.StylerStub) -> None:
    styler = load_styler(str(QWEN3))
    a = styler.tokenize("<think>\nhmm\n</think>\n\nFirst 日本 answer. STOP here", False)
    b = styler.tokenize('<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call>', False)

    async def requests() -> AsyncIterator[styler_pb2.DetokenizeStreamRequest]:
        start = styler_pb2.DetokenizeStreamStart(
            request_id="r1", stop=["STOP"], tool_parser="auto", reasoning_parser="auto", num_choices=2
        )
        yield styler_pb2.DetokenizeStreamRequest(start=start)
        for i in range(max(len(a), len(b))):
            deltas = [
                styler_pb2.TokenDelta(index=index, token_ids=ids[i : i + 1], finished=i == len(ids) - 1)
                for index, ids in ((0, a), (1, b))
                if i < len(ids)
            ]
            yield styler_pb2.DetokenizeStreamRequest(deltas=styler_pb2.TokenDeltas(deltas=deltas))

    out: dict[int, dict[str, object]] = {0: {}, 1: {}}
    async for reply in stub.DetokenizeStream(requests()):
        for d in reply.deltas:
            got = out[d.index]
            got["text"] = str(got.get("text", "")) + d.text
            got["reasoning"] = str(got.get("reasoning", "")) + d.reasoning_text
            got.setdefault("calls", [])
            got["calls"] += [(c.index, c.name, c.arguments) for c in d.tool_calls]  # type: ignore[operator]
            if d.stopped:
                got["stop"] = d.matched_stop
            if d.finished:
                got["finished"] = True
    assert out[0] == {
        "text": "First 日本 answer. ",
        "reasoning": "hmm\n",
        "calls": [],
        "stop": "STOP",
        "finished": True,
    }
    assert out[1] == {"text": "", "reasoning": "", "calls": [(0, "f", '{"x": "é"}')], "finished": True}

    async def no_start() -> AsyncIterator[styler_pb2.DetokenizeStreamRequest]:
        yield styler_pb2.DetokenizeStreamRequest(deltas=styler_pb2.TokenDeltas())

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.DetokenizeStream(no_start()):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.e2e
async def test_tandem_styler_command_serves(tmp_path: Path) -> None:
    """`tandem styler --model ../shared/tokenizers/qwen3` as a process, over a unix socket."""
    address = f"unix:{tmp_path / 'styler.sock'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem", "styler", "--model", str(QWEN3), "--address", address], env=env
    )
    try:
        await wait_for_serving(address, timeout_s=60, service=SERVICE_NAME)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = styler_pb2_grpc.StylerStub(channel)
            ids = (await stub.Tokenize(styler_pb2.TokenizeRequest(text="hi there"))).token_ids
            assert (await stub.Detokenize(styler_pb2.DetokenizeRequest(token_ids=ids))).text == "hi there"
            rendered = await stub.Render(
                styler_pb2.RenderRequest(messages=[common_pb2.ChatMessage(role="user", text="hi")])
            )
            assert rendered.prompt.endswith("<|im_start|>assistant\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0


def _user(text: str = "hi", **fields: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role="user", text=text, **fields)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            styler_pb2.RenderRequest(messages=[_user(extra_json=json.dumps({"content": "a\ud800b"}))]),
            "messages[0].extra_json",
        ),
        (
            styler_pb2.RenderRequest(
                messages=[
                    _user(),
                    common_pb2.ChatMessage(
                        role="assistant",
                        tool_calls=[
                            common_pb2.ToolCall(id="c", name="f", arguments=json.dumps({"a": "\udc00"}))
                        ],
                    ),
                ]
            ),
            "messages[1].tool_calls[0].arguments",
        ),
        (
            styler_pb2.RenderRequest(
                messages=[_user()], tools_json=json.dumps([{"function": {"name": "\ud800"}}])
            ),
            "tools_json",
        ),
        (
            styler_pb2.RenderRequest(
                messages=[_user()], chat_template_kwargs_json=json.dumps({"x": "\ud800"})
            ),
            "chat_template_kwargs_json",
        ),
    ],
)
async def test_lone_surrogates_are_invalid_argument_naming_the_field(
    stub: styler_pb2_grpc.StylerStub, request_: styler_pb2.RenderRequest, field: str
) -> None:
    """JSON text can escape a lone surrogate ("\\ud800") that UTF-8 protobuf strings cannot carry."""
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Render(request_, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field} contains a lone UTF-16 surrogate"), exc.value.details()


async def test_render_errors_name_the_field_and_line(stub: styler_pb2_grpc.StylerStub) -> None:
    for template, details in (
        ('{{ "%2000000000d" % 1 }}', "chat_template: format width 2000000000 exceeds the limit of 100000"),
        (
            "{% for m in messages %}\n{{ raise_exception('no ' + m.role) }}{% endfor %}",
            "messages[0]: no user (chat template line 2)",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Render(
                styler_pb2.RenderRequest(messages=[_user()], chat_template=template), timeout=10
            )
        assert (exc.value.code(), exc.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)


def _start(**fields: object) -> styler_pb2.DetokenizeStreamRequest:
    return styler_pb2.DetokenizeStreamRequest(start=styler_pb2.DetokenizeStreamStart(**fields))  # type: ignore[arg-type]


def _deltas(index: int, ids: list[int], finished: bool) -> styler_pb2.DetokenizeStreamRequest:
    return styler_pb2.DetokenizeStreamRequest(
        deltas=styler_pb2.TokenDeltas(
            deltas=[styler_pb2.TokenDelta(index=index, token_ids=ids, finished=finished)]
        )
    )


@pytest.mark.parametrize(
    ("messages", "details"),
    [
        (
            [_start(prompt_token_ids=[1, 10**9])],
            "start.prompt_token_ids: token id 1000000000",
        ),
        ([_deltas(0, [1], False)], "the first message must be `start`"),
        ([_start(), _start()], "`start` may only be sent once"),
        ([_start(), _deltas(3, [1], False)], "deltas[].index 3 is outside"),
        (
            [_start(stop=["x"], first_choice_index=2**32 - 1, num_choices=4), _deltas(0, [1], False)],
            "deltas[].index 0",
        ),
    ],
)
async def test_malformed_detokenize_streams_end_with_invalid_argument(
    stub: styler_pb2_grpc.StylerStub, messages: list[styler_pb2.DetokenizeStreamRequest], details: str
) -> None:
    """Each ends at once with INVALID_ARGUMENT naming the field, without the client half-closing.
    The last message is the malformed one (a write after the server ended the stream fails on
    the client's side), and the client reads the responses (gRPC reports the status after them)."""
    stream = stub.DetokenizeStream(timeout=20)
    for message in messages:
        await stream.write(message)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stream:
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert exc.value.details().startswith(details), exc.value.details()
