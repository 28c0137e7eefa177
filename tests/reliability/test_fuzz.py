"""Property-based fuzzing: the HTTP API from its own `/openapi.json` (schemathesis, valid and
invalid bodies), and the worker and styler protos with random and boundary messages (hypothesis).
No 5xx / INTERNAL, no crash, no leaked KV blocks; fields the document declares are never refused
as unknown."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from typing import Any

import grpc
import pytest
import schemathesis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc, worker_pb2, worker_pb2_grpc

from .rstack import ReliabilityStack, kv_blocks_used, kv_blocks_used_once_settled

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = 8  # per operation and mode: bounded time on 2 cores (benchmarks/soak.py runs longer)
# No shrinking: a failure is reported as found (shrinking against a live stack takes minutes).
PHASES = [Phase.explicit, Phase.generate]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=PHASES,
)
# Refusals of what `/openapi.json` can express: the document must refuse them as well, so a
# case generated from it (positive mode) never gets one.
_SCHEMA_REFUSAL = re.compile(
    r"must be (a|an) |must be [<>]= -?\d|must not be empty|give exactly one|give at most one|requires '|"
    r"only allowed when|unknown or unsupported field|is not supported yet|lone UTF-16|nests JSON|"
    r"strings; at most|must be a non-empty"
)
# gateway/structured_output.worker_error: what follows is the grammar compiler's message
_COMPILER_QUOTED = " cannot be used for guided decoding:"
# Status codes that say "your request" or "try later", never "we broke".
ALLOWED_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_http_api_from_openapi(limited_stack: ReliabilityStack, mode: GenerationMode) -> None:
    url = limited_stack.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/tokenize"}
    seen: list[int] = []
    for op in operations:

        @FUZZ_SETTINGS
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(base_url=url, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500 or (
                response.status_code == 503 and "Retry-After" in response.headers
            ), (
                case.path,
                case.body,
                response.status_code,
                response.text[:500],
            )
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and "Traceback" not in error["message"]
                if mode == GenerationMode.POSITIVE:  # what the document declares is accepted
                    # (a 400 only for what it cannot express: token counts, templates, grammars...;
                    # a grammar's own compile error is quoted after the marker, in its compiler's
                    # words, such as "key must be a string": not a refusal of ours)
                    ours = error["message"].split(_COMPILER_QUOTED)[0]
                    assert not _SCHEMA_REFUSAL.search(ours), (case.body, error)

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters
            assert mode == GenerationMode.NEGATIVE, op.path
    assert 200 in seen or mode == GenerationMode.NEGATIVE
    if mode == GenerationMode.POSITIVE:  # a case CI met: a grammar the compiler refuses in its words
        import requests

        body = {"messages": [{"role": "user", "content": "x"}], "guided_grammar": "{\x85", "max_tokens": 2}
        response = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "guided_grammar", error
        assert _COMPILER_QUOTED in error["message"], error
        assert not _SCHEMA_REFUSAL.search(error["message"].split(_COMPILER_QUOTED)[0]), error
    assert asyncio.run(kv_blocks_used(limited_stack.worker_addresses[0])) == 0


_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, -2.0, 1e-45, math.inf, -math.inf, math.nan]),
)
_BOUNDARY_INT = st.sampled_from([0, 1, 511, 512, 2**31 - 1, 2**31, 2**32 - 1])  # uint32 fields


@st.composite
def _generate_requests(draw: st.DrawFn) -> worker_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        n=draw(st.integers(0, 4)),
        min_tokens=draw(st.integers(0, 40)),
        ignore_eos=draw(st.booleans()),
        stop_token_ids=draw(st.lists(st.one_of(st.integers(0, 600), _BOUNDARY_INT), max_size=3)),
    )
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if draw(st.booleans()):
            setattr(sampling, name, draw(_FLOAT))
    for name, ints in (
        ("max_tokens", st.integers(0, 48)),
        ("top_k", st.integers(-2, 600)),
        ("seed", st.integers(0, 2**64 - 1)),
        ("logprobs", st.integers(0, 30)),
        ("prompt_logprobs", st.integers(0, 5)),
    ):
        if draw(st.booleans()):
            setattr(sampling, name, draw(ints))
    token = st.one_of(st.integers(0, 511), _BOUNDARY_INT)
    sampling.logit_bias.update(draw(st.dictionaries(token, _FLOAT, max_size=3)))
    return worker_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.text(min_size=1, max_size=40))),
        prompt_token_ids=draw(st.lists(token, max_size=600)),
        generated_token_ids=draw(st.lists(token, max_size=4)),
        sampling=sampling,
        first_choice_index=draw(st.integers(0, 2**31 - 1)),
    )


_VALID = worker_pb2.GenerateRequest(
    request_id="valid",
    prompt_token_ids=[1, 403, 407],
    sampling=common_pb2.SamplingParams(max_tokens=8, n=2, logprobs=2),
)


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_worker_proto_fuzz(limited_stack: ReliabilityStack) -> None:
    address = limited_stack.worker_addresses[0]
    codes: list[grpc.StatusCode] = []

    async def generate(request: worker_pb2.GenerateRequest, cancel_after: int | None) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=60)
            try:
                received = 0
                async for _ in call:
                    received += 1
                    if cancel_after is not None and received >= cancel_after:
                        call.cancel()  # a client going away mid-stream must free the blocks too
                        break
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in ALLOWED_GRPC, (request, exc.code(), exc.details())
                assert exc.details()
                codes.append(exc.code())

    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=PHASES
    )
    @given(request=_generate_requests(), cancel_after=st.one_of(st.none(), st.integers(1, 3)))
    @example(request=_VALID, cancel_after=None)
    @example(request=_VALID, cancel_after=1)
    def run(request: worker_pb2.GenerateRequest, cancel_after: int | None) -> None:
        asyncio.run(generate(request, cancel_after))

    run()

    async def settle() -> int:
        used = await kv_blocks_used_once_settled(address)
        assert await _serving(address)
        return used

    assert asyncio.run(settle()) == 0
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes


_TEXT = st.text(max_size=200)
_JINJA = st.one_of(
    _TEXT,
    st.sampled_from(
        ["{{", "{% for %}", "{{ messages[0] }}", "{% if x %}", "{{ raise_exception('no') }}", "{{ 1/0 }}"]
    ),
)


@st.composite
def _styler_calls(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["render", "tokenize", "detokenize", "stream"]))
    if kind == "tokenize":
        return kind, styler_pb2.TokenizeRequest(text=draw(_TEXT), add_special_tokens=draw(st.booleans()))
    if kind == "detokenize":
        ids = draw(st.lists(st.one_of(st.integers(0, 600), _BOUNDARY_INT), max_size=20))
        return kind, styler_pb2.DetokenizeRequest(
            token_ids=ids, skip_special_tokens=draw(st.booleans()), return_token_bytes=draw(st.booleans())
        )
    if kind == "render":
        messages = [
            common_pb2.ChatMessage(role=draw(st.text(max_size=10)), text=draw(_TEXT), extra_json=draw(st.sampled_from(["", "{}", "[1]", "{bad", '{"x": 1}'])))
            for _ in range(draw(st.integers(0, 3)))
        ]  # fmt: skip
        request = styler_pb2.RenderRequest(
            messages=messages,
            tools_json=draw(st.sampled_from(["", "[]", "{}", "[{}]", "not json"])),
            chat_template_kwargs_json=draw(st.sampled_from(["", "{}", '{"messages": 1}', "[]"])),
            continue_final_message=draw(st.booleans()),
        )
        if draw(st.booleans()):
            request.chat_template = draw(_JINJA)
        return kind, request
    start = styler_pb2.DetokenizeStreamStart(
        request_id=draw(st.text(max_size=10)),
        prompt_token_ids=draw(st.lists(st.integers(0, 600), max_size=5)),
        stop=draw(st.lists(st.text(max_size=5), max_size=3)),
        num_choices=draw(st.integers(0, 3)),
        first_choice_index=draw(st.integers(0, 5)),
        tool_parser=draw(st.sampled_from(["", "auto", "hermes", "nope"])),
        reasoning_parser=draw(st.sampled_from(["", "auto", "qwen3", "nope"])),
    )
    deltas = [
        styler_pb2.TokenDeltas(
            deltas=[styler_pb2.TokenDelta(index=draw(st.integers(0, 6)), token_ids=draw(st.lists(st.integers(0, 600), max_size=4)), finished=draw(st.booleans()))]
        )
        for _ in range(draw(st.integers(0, 4)))
    ]  # fmt: skip
    messages = [styler_pb2.DetokenizeStreamRequest(start=start)]
    if draw(st.booleans()):
        messages = messages[:0]  # no start at all
    messages += [styler_pb2.DetokenizeStreamRequest(deltas=d) for d in deltas]
    return kind, messages


def test_styler_proto_fuzz(limited_stack: ReliabilityStack) -> None:
    address = limited_stack.styler_address
    codes: list[grpc.StatusCode] = []

    async def call(kind: str, request: Any) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = styler_pb2_grpc.StylerStub(channel)
            try:
                if kind == "stream":
                    stream = stub.DetokenizeStream(timeout=5)
                    for message in request:
                        if stream.done():  # the server already ended the rpc (e.g. refused `start`)
                            break
                        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                            await stream.write(message)
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await stream.done_writing()
                    # gRPC reports a stream's status only after its responses have been read: a
                    # client that does not read them waits for its deadline (the "stream stays
                    # open" this test once allowed), whatever the server did.
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        async for _ in stream:
                            pass
                    code = await stream.code()
                    if (
                        code == grpc.StatusCode.INTERNAL
                        and await stream.details() == "Internal error from Core"
                    ):
                        return  # the client's own write raced the server ending the rpc (client side)
                    assert code in ALLOWED_GRPC, (
                        request,
                        code,
                        await stream.details(),
                    )
                    codes.append(code)
                    return
                else:
                    method = {
                        "render": stub.Render,
                        "tokenize": stub.Tokenize,
                        "detokenize": stub.Detokenize,
                    }[kind]
                    await method(request, timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in ALLOWED_GRPC, (kind, request, exc.code(), exc.details())
                codes.append(exc.code())

    @settings(
        max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=PHASES
    )
    @given(item=_styler_calls())
    def run(item: tuple[str, Any]) -> None:
        asyncio.run(call(*item))

    run()
    assert asyncio.run(_serving(address))
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes
