"""Client input never yields a 5xx (issue 28): lone surrogates, JSON nested 100,000 deep, raw
invalid protobuf to every service, out-of-range choice indices, huge guided-decoding constraints,
requests aiohttp's own parser refuses, 405 / 401 headers, and the OpenAPI document agreeing with
the validator. Each is a 400 / INVALID_ARGUMENT naming the field, quickly, with no exception text."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import jsonschema
import pytest

from gateway.errors import one_line
from gateway.json_text import MAX_JSON_DEPTH
from gateway.structured_output import MAX_GUIDED_BYTES, MAX_GUIDED_CHOICES
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import kill_process

from .rstack import ReliabilityStack, free_port

pytestmark = pytest.mark.e2e

CHAT = {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 2}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 2}
SURROGATE = "a\ud800b"  # json.dumps writes it as "a\\ud800b"
DEEP = 100_000


async def _post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"data": raw, "headers": {"Content-Type": "application/json"}}
        if raw is None:
            kwargs = {"json": body}
        async with session.post(url, **kwargs) as reply:
            if reply.content_type != "application/json":  # a stream
                return reply.status, {"text": await reply.text()}, time.monotonic() - started
            return reply.status, await reply.json(), time.monotonic() - started


def _assert_clean_400(status: int, body: dict[str, Any], param: str) -> None:
    error = body["error"]
    assert status == 400, body
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "Error:" not in error["message"], error


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["ok", SURROGATE]}, "prompt[1]"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
        ("/v1/completions", {**COMPLETION, "stop": [SURROGATE]}, "stop[0]"),
        ("/v1/completions", {**COMPLETION, "stop": SURROGATE}, "stop"),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {**COMPLETION, "guided_regex": SURROGATE}, "guided_regex"),
        ("/v1/completions", {**COMPLETION, "guided_json": '{"enum": ["a\\ud800"]}'}, "guided_json"),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {SURROGATE: 1}}, "chat_template_kwargs"),
    ],
)  # fmt: skip
async def test_lone_surrogates_are_400_naming_the_field(
    limited_stack: ReliabilityStack, route: str, body: dict[str, Any], param: str
) -> None:
    status, reply, _ = await _post(limited_stack.url + route, body)
    _assert_clean_400(status, reply, param)
    assert "surrogate" in reply["error"]["message"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        ("/v1/completions", b'{"prompt": ' + _nested(DEEP).encode() + b"}", "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "tools": ' + _nested(DEEP).encode() + b"}", "tools"),
        ("/v1/completions", b'{"prompt": "a", "guided_json": ' + _nested(MAX_JSON_DEPTH + 1).encode() + b"}", "guided_json"),
        ("/v1/completions", b'{"prompt": "a", "guided_json": "' + _nested(DEEP).encode() + b'"}', "guided_json"),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"x": ' + _nested(DEEP).encode() + b"}}", "chat_template_kwargs"),
    ],
)  # fmt: skip
async def test_deep_json_is_a_quick_400_naming_the_field(
    limited_stack: ReliabilityStack, route: str, raw: bytes, param: str
) -> None:
    status, reply, elapsed = await _post(limited_stack.url + route, None, raw=raw)
    _assert_clean_400(status, reply, param)
    assert f"deeper than {MAX_JSON_DEPTH}" in reply["error"]["message"]
    assert elapsed < 2.0
    # At the limit a body is read (and refused for other reasons or served).
    at_limit = (
        b'{"prompt": "a", "max_tokens": 1, "chat_template_kwargs": '
        + _nested(MAX_JSON_DEPTH - 1).encode()
        + b"}"
    )
    status, reply, _ = await _post(limited_stack.url + "/v1/completions", None, raw=at_limit)
    assert reply["error"]["param"] == "chat_template_kwargs" and "deeper" not in reply["error"]["message"]


async def test_grpc_api_json_fields_deep_or_surrogate_are_invalid_argument(
    limited_stack: ReliabilityStack,
) -> None:
    message = common_pb2.ChatMessage(role="user", text="a")
    requests = {
        "tools_json": inference_pb2.ChatCompletionRequest(messages=[message], tools_json=_nested(DEEP)),
        "chat_template_kwargs_json": inference_pb2.ChatCompletionRequest(
            messages=[message], chat_template_kwargs_json='{"a": ' + _nested(DEEP) + "}"
        ),
        "messages.extra_json": inference_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", text="a", extra_json='{"x": "\\ud800"}')]
        ),
        "guided_json": inference_pb2.ChatCompletionRequest(
            messages=[message],
            options=inference_pb2.GenerationOptions(
                guided=common_pb2.GuidedDecoding(json_schema=_nested(DEEP))
            ),
        ),
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited_stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for field, request in requests.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ChatCompletion(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, info.value.details())
            assert f"'{field}" in (info.value.details() or ""), (field, info.value.details())


GARBAGE = b"\xff\xff\xff\xff\x0fnot a protobuf message"


async def _send_garbage(address: str, method: str, streaming: bool) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            if streaming:
                call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
                    timeout=10
                )
                await call.write(GARBAGE)
                await call.done_writing()
                async for _ in call:
                    pass
            else:
                await channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    GARBAGE, timeout=10
                )
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError(f"{method} accepted garbage")


async def test_invalid_protobuf_is_invalid_argument_in_every_service(limited_stack: ReliabilityStack) -> None:
    gateway = f"127.0.0.1:{limited_stack.grpc_port}"
    calls = [
        (limited_stack.styler_address, "/tandem.v1.Styler/Tokenize", False),
        (limited_stack.styler_address, "/tandem.v1.Styler/Render", False),
        (limited_stack.styler_address, "/tandem.v1.Styler/DetokenizeStream", True),
        (limited_stack.worker_addresses[0], "/tandem.v1.Worker/Generate", False),
        (limited_stack.worker_addresses[0], "/tandem.v1.Worker/GetLoad", False),
        (gateway, "/tandem.v1.Inference/ChatCompletion", False),
        (gateway, "/tandem.v1.Inference/CompletionStream", False),
    ]
    for address, method, streaming in calls:
        exc = await _send_garbage(address, method, streaming)
        details = exc.details() or ""
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, exc.code(), details)
        assert "not a valid protobuf" in details and "Error" not in details and "class" not in details, (
            details
        )


async def test_choice_index_past_uint32_is_invalid_argument(limited_stack: ReliabilityStack) -> None:
    request = worker_pb2.GenerateRequest(
        request_id="fci",
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(n=4, max_tokens=2),
        first_choice_index=2**32 - 1,
    )
    async with grpc.aio.insecure_channel(limited_stack.worker_addresses[0]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=10):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("first_choice_index:")
    # The largest index that fits is served.
    request.first_choice_index = 2**32 - 4
    async with grpc.aio.insecure_channel(limited_stack.worker_addresses[0]) as channel:
        replies = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=30)]
    assert {c.index for r in replies for c in r.choices} == {2**32 - 4, 2**32 - 3, 2**32 - 2, 2**32 - 1}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_choice": [f"choice {i}" for i in range(100_000)]}, "guided_choice"),
        ({"guided_choice": ["x" * (MAX_GUIDED_BYTES // 2 + 1)] * 2}, "guided_choice"),
        ({"structured_outputs": {"choice": [str(i) for i in range(MAX_GUIDED_CHOICES + 1)]}}, "structured_outputs"),
        ({"guided_regex": "a" * (MAX_GUIDED_BYTES + 1)}, "guided_regex"),
        ({"guided_grammar": "start: " + '"a" ' * MAX_GUIDED_BYTES}, "guided_grammar"),
        ({"guided_json": {"enum": ["x" * MAX_GUIDED_BYTES]}}, "guided_json"),
    ],
)  # fmt: skip
async def test_huge_guided_constraints_are_quick_400s(
    limited_stack: ReliabilityStack, body: dict[str, Any], param: str
) -> None:
    status, reply, elapsed = await _post(limited_stack.url + "/v1/completions", {**COMPLETION, **body})
    _assert_clean_400(status, reply, param)
    assert "at most" in reply["error"]["message"] and elapsed < 2.0


async def test_compiler_errors_are_one_short_line(limited_stack: ReliabilityStack) -> None:
    for body in ({"guided_grammar": "start: (((\n"}, {"guided_regex": "(a"}, {"guided_json": {"type": 7}}):
        status, reply, _ = await _post(limited_stack.url + "/v1/completions", {**COMPLETION, **body})
        message = reply["error"]["message"]
        assert status == 400, reply
        assert "\n" not in message and len(message) <= 400 and "panicked" not in message, message
    panic = "\n  thread 'main' panicked at x.rs:1:\n  too many\nstack backtrace:\n   0: 0x55d1 - std::rt\n"
    assert one_line(panic) == "thread 'main' panicked at x.rs:1: too many"
    assert len(one_line("y" * 10_000)) == 300


def _raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/models?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"NOT A REQUEST LINE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    ],
)
def test_parser_errors_use_the_envelope(limited_stack: ReliabilityStack, request_bytes: bytes) -> None:
    status, headers, body = _raw_http(limited_stack.port, request_bytes)
    assert 400 <= status < 500 and headers["content-type"].startswith("application/json"), (status, body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert b"aaaa" not in body  # the offending bytes are not echoed


async def test_405_carries_allow(limited_stack: ReliabilityStack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.delete(limited_stack.url + "/v1/completions") as reply:
            assert reply.status == 405 and reply.headers["Allow"] == "POST"
            assert (await reply.json())["error"]["message"]
        async with session.post(limited_stack.url + "/v1/models") as reply:
            assert reply.status == 405 and "GET" in reply.headers["Allow"]


@pytest.fixture(scope="module")
def keyed_gateway(limited_stack: ReliabilityStack) -> Iterator[str]:
    """A second gateway with an API key, in front of the limited stack's styler and worker."""
    port = free_port()
    process = limited_stack.start_gateway("gateway-keyed", port, ["--api-key", "sk-hostile-test"])
    try:
        limited_stack.wait_healthy(port, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_process(limited_stack.procs.pop("gateway-keyed", process))


async def test_401_carries_www_authenticate(keyed_gateway: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(keyed_gateway + "/v1/completions", json=COMPLETION) as reply,
    ):
        assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await reply.json())["error"]["type"] == "authentication_error"
    # A key that is not UTF-8 (aiohttp keeps such header bytes as surrogate escapes) is just wrong.
    port = int(keyed_gateway.rsplit(":", 1)[1])
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xed\r\nConnection: close\r\n\r\n"
    status, headers, _ = await asyncio.to_thread(_raw_http, port, request)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer sk-hostile-test"}
        async with session.post(keyed_gateway + "/v1/completions", json=COMPLETION, headers=headers) as reply:
            assert reply.status == 200, await reply.text()


def _document_accepts(document: dict[str, Any], schema: str, body: dict[str, Any]) -> bool:
    resolver_root = {**document, "$ref": f"#/components/schemas/{schema}"}
    return jsonschema.Draft202012Validator(resolver_root).is_valid(body)


@pytest.mark.parametrize(
    ("route", "schema", "body", "param"),
    [
        ("/tokenize", "TokenizeRequest", {}, "prompt"),
        ("/tokenize", "TokenizeRequest", {"prompt": "a", "tools": [{"function": {"name": "f"}}]}, "prompt"),
        ("/v1/completions", "CompletionRequest", {**COMPLETION, "guided_regex": "a+", "structured_outputs": {"regex": "b+"}}, "structured_outputs"),
        ("/v1/completions", "CompletionRequest", {**COMPLETION, "response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
        ("/v1/completions", "CompletionRequest", {**COMPLETION, "top_p": 1e-46}, "top_p"),
        ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT, "repetition_penalty": 5e-324}, "repetition_penalty"),
        ("/v1/completions", "CompletionRequest", {**COMPLETION, "repetition_penalty": 1e300}, "repetition_penalty"),
        ("/tokenize", "TokenizeRequest", {"prompt": "a", "messages": CHAT["messages"]}, "prompt"),
        ("/v1/completions", "CompletionRequest", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ],
)  # fmt: skip
async def test_openapi_document_refuses_what_validation_refuses(
    limited_stack: ReliabilityStack, route: str, schema: str, body: dict[str, Any], param: str
) -> None:
    async with aiohttp.ClientSession() as session, session.get(limited_stack.url + "/openapi.json") as reply:
        document = await reply.json()
    assert not _document_accepts(document, schema, body)
    status, reply, _ = await _post(limited_stack.url + route, body)
    _assert_clean_400(status, reply, param)
    # The neighbours the document accepts are served.
    fine = {k: v for k, v in body.items() if k not in ("structured_outputs", "guided_choice", "tools")}
    if route == "/tokenize":
        fine = {"prompt": "a"}
    fine.update({"top_p": 2.0**-149} if "top_p" in body else {})
    fine.update({"repetition_penalty": 2.0**-149} if "repetition_penalty" in body else {})
    fine.update({"stream": True} if "stream_options" in body else {})
    fine.update({"logprobs": True} if "top_logprobs" in body else {})
    assert _document_accepts(document, schema, fine)
    status, reply, _ = await _post(limited_stack.url + route, fine)
    assert status == 200, reply


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/models/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: \xff\xfe\r\nConnection: close\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: \xff\xfe\r\nConnection: close\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; charset=\xff\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 14\r\nConnection: close\r\n\r\n{"prompt":"\xff"}',
    ],
)
def test_bytes_that_are_not_utf8_are_never_a_5xx(
    limited_stack: ReliabilityStack, request_bytes: bytes
) -> None:
    status, _, body = _raw_http(limited_stack.port, request_bytes)
    assert status < 500, (status, body)
    if status >= 400:
        assert json.loads(body)["error"]["message"]
