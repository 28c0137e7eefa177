"""Unit tests of the gateway's pure parts: validation, routing, response shapes, admission."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import deadline
from gateway.admission import AdmissionGate
from gateway.downstream import ToolCallDelta
from gateway.errors import APIError
from gateway.execution import ChoiceUpdate, PromptRun, RequestRun
from gateway.grpc_errors import from_grpc
from gateway.responses import ChatResult, CompletionResult
from gateway.router import MISSED_CHECKS_OUT, PREFIX_CHUNK, Router
from gateway.validation import parse_chat, parse_completion, parse_tokenize
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.e2e.stack import free_port

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_defaults_follow_openai() -> None:
    req = parse_chat({"messages": MESSAGES})
    p, sp = req.params, req.params.sampling
    assert (sp.n, sp.max_tokens, sp.temperature, p.stream, sp.logprobs, p.stop) == (
        1,
        None,
        1.0,
        False,
        None,
        (),
    )
    assert p.skip_special_tokens and req.add_generation_prompt and req.tool_choice == "none"
    req = parse_chat({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 7, "stop": "x"})
    assert req.params.sampling.max_tokens == 7 and req.params.stop == ("x",)
    req = parse_chat({"messages": MESSAGES, "logprobs": True, "top_logprobs": 4, "top_k": -1})
    assert req.params.sampling.logprobs == 4 and req.params.sampling.top_k == 0
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert parse_chat({"messages": MESSAGES, "tools": tools}).tool_choice == "auto"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "seed": 1.5}, "seed"),
        ({"messages": MESSAGES, "stream": 1}, "stream"),
        ({"messages": MESSAGES, "stop": ["a"] * 17}, "stop"),
        ({"messages": MESSAGES, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"messages": MESSAGES, "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": MESSAGES, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": MESSAGES, "continue_final_message": True}, "messages"),
        ({"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": MESSAGES, "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"messages": MESSAGES, "reasoning_effort": 3}, "reasoning_effort"),
    ],
)
def test_chat_rejections_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_chat(body)
    assert err.value.status == 400 and err.value.param == param


def test_reasoning_effort_is_a_template_variable() -> None:
    """gpt-oss's template reads `reasoning_effort`; chat_template_kwargs' own value wins."""
    req = parse_chat({"messages": MESSAGES, "reasoning_effort": "high"})
    assert req.chat_template_kwargs == {"reasoning_effort": "high"}
    req = parse_chat(
        {
            "messages": MESSAGES,
            "reasoning_effort": "low",
            "chat_template_kwargs": {"reasoning_effort": "medium", "x": 1},
        }
    )
    assert req.chat_template_kwargs == {"reasoning_effort": "medium", "x": 1}
    assert parse_chat({"messages": MESSAGES, "reasoning_effort": None}).chat_template_kwargs is None


def test_neutral_values_of_unsupported_fields_pass() -> None:
    parse_chat({"messages": MESSAGES, "response_format": {"type": "text"}, "logit_bias": {}, "store": False})


def test_completion_prompt_forms() -> None:
    assert parse_completion({"prompt": "a"}).prompts == ("a",)
    assert parse_completion({"prompt": ["a", "b"]}).prompts == ("a", "b")
    assert parse_completion({"prompt": [1, 2]}).prompts == ((1, 2),)
    assert parse_completion({"prompt": [[1], [2, 3]]}).prompts == ((1,), (2, 3))
    assert parse_completion({"prompt": "a", "logprobs": 0}).params.sampling.logprobs == 0
    assert parse_completion({"prompt": [7.0, 2**32 - 1]}).prompts == ((7, 2**32 - 1),)  # JSON Schema integers
    assert parse_completion({"prompt": [[1.0], [0]]}).prompts == ((1,), (0,))
    ids = list(range(5000))
    assert parse_completion({"prompt": ids}).prompts == (tuple(ids),)
    for bad in ([], [1, "a"], [[1], []], 5, "", [1, True], [-1], [2**32], [1.5], [[1], [True]], [[1], -1]):
        with pytest.raises(APIError):
            parse_completion({"prompt": bad})


def test_tokenize_needs_exactly_one_input() -> None:
    assert parse_tokenize({"prompt": "x"}).add_special_tokens
    assert not parse_tokenize({"messages": MESSAGES}).add_special_tokens
    with pytest.raises(APIError):
        parse_tokenize({})


async def test_router_least_load_and_prefix_affinity() -> None:
    router = Router(["unix:/tmp/a.sock", "unix:/tmp/b.sock"])
    a, b = router.workers
    a.healthy = b.healthy = True
    prompt = list(range(PREFIX_CHUNK * 3))
    first = router.pick(prompt)
    other = b if first is a else a
    assert router.pick([*prompt, 7, 8]) is first  # same prefix: same worker
    first.reported_load = 50  # far busier: affinity gives way to load
    assert router.pick(prompt) is other
    first.reported_load = 0
    assert router.pick([99] * PREFIX_CHUNK) in (a, b)
    with router.track(a):
        assert router.pick([5] * 3) is b  # short prompt, no affinity: least loaded
    router.mark_failed(a)
    router.mark_failed(b)
    with pytest.raises(Exception, match="no worker"):
        router.pick(prompt)
    await router.close()


def _run() -> tuple[RequestRun, PromptRun]:
    prompt = PromptRun(token_ids=(1, 2, 3), text="abc")
    prompt.completion_tokens = 4
    return RequestRun("r1", [prompt]), prompt


def test_chat_result_tool_calls_finish_and_shape() -> None:
    run, prompt = _run()
    result = ChatResult("r1", "m", 0, 1, logprobs=False, parallel_tool_calls=False, include_usage=True)
    chunks = result.add(ChoiceUpdate(0, prompt, reasoning="hmm"))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"reasoning_content": "hmm"}
    result.add(ChoiceUpdate(0, prompt, tool_calls=(ToolCallDelta(0, "call_1", "f", '{"a"'),)))
    dropped = result.add(ChoiceUpdate(0, prompt, tool_calls=(ToolCallDelta(1, "call_2", "g", "{}"),)))
    assert dropped == []  # parallel_tool_calls=false keeps only the first call
    last = result.add(
        ChoiceUpdate(0, prompt, tool_calls=(ToolCallDelta(0, "", "", ": 1}"),), finish_reason="stop")
    )
    assert last[0]["choices"][0]["finish_reason"] == "tool_calls"
    body = result.response(run)
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "hmm"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert result.usage_chunk(run)["choices"] == []


def test_completion_result_echo() -> None:
    run, prompt = _run()
    result = CompletionResult("r1", "m", 0, 1, logprobs=None, echo=True)
    assert result.add(ChoiceUpdate(0, prompt, text="d"))[0]["choices"][0]["text"] == "abcd"
    result.add(ChoiceUpdate(0, prompt, text="e", finish_reason="length"))
    body = result.response(run)
    assert body["choices"][0]["text"] == "abcde" and body["choices"][0]["finish_reason"] == "length"


async def test_admission_counts_and_refuses() -> None:
    gate = AdmissionGate(max_waiting=1, max_running=0)
    async with gate.admit() as admission:
        assert (gate.num_waiting, gate.num_running) == (1, 0)
        with pytest.raises(APIError) as err:
            async with gate.admit():
                pass
        assert err.value.status == 429 and err.value.headers()["Retry-After"] == "1"
        admission.started()
        assert (gate.num_waiting, gate.num_running) == (0, 1)
    assert (gate.num_waiting, gate.num_running) == (0, 0)


def test_downstream_failure_after_the_deadline_is_a_timeout() -> None:
    """grpcio reports a stream write that races the deadline as INTERNAL; the client asked for a
    timeout and gets 504, while the same failure inside the deadline stays a 502."""
    internal = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")
    invalid = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad 'n'"
    )

    def under(timeout_s: float | None, exc: grpc.aio.AioRpcError) -> APIError:
        def convert() -> APIError:
            deadline.start(timeout_s)
            time.sleep(0.002)
            return from_grpc(exc, "styler")

        return contextvars.copy_context().run(convert)

    assert under(0.001, internal).status == 504
    assert under(0.001, internal).body()["error"]["code"] == "timeout"
    assert under(60.0, internal).status == 502
    assert under(None, internal).status == 502
    assert under(0.001, invalid).status == 400  # the client's own mistake stays one


def test_chat_message_shape_is_openais() -> None:
    """No `tool_calls` key without calls, `refusal: null`, and `content: null` for an answer that is
    all reasoning ("" only for an empty answer), as OpenAI sends them (issue 27)."""
    run, prompt = _run()
    for update, content in (
        (ChoiceUpdate(0, prompt, reasoning="hmm", finish_reason="length"), None),
        (ChoiceUpdate(0, prompt, finish_reason="stop"), ""),
    ):
        result = ChatResult("r1", "m", 0, 1, logprobs=False, parallel_tool_calls=True)
        result.add(update)
        message = result.response(run)["choices"][0]["message"]
        assert message["content"] == content and message["refusal"] is None
        assert "tool_calls" not in message


def test_continuous_usage_stats_is_accepted() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    params = parse_chat({"messages": MESSAGES, "stream": True, "stream_options": options}).params
    assert params.continuous_usage and params.include_usage
    assert not parse_chat({"messages": MESSAGES, "stream": True}).params.continuous_usage
    with pytest.raises(APIError) as err:
        parse_chat({"messages": MESSAGES, "stream": True, "stream_options": {"continuous_usage_stats": 1}})
    assert err.value.param == "stream_options.continuous_usage_stats"


def test_worker_statuses_fail_the_request_not_the_worker() -> None:
    """The failure contract (docs/gateway.md): a status that describes one request is that
    request's answer; only UNAVAILABLE takes a worker out of rotation."""
    from gateway.downstream import Guided
    from gateway.worker_stream import BACK_PRESSURE, WORKER_GONE, _client_error
    from services.common.sampling import SamplingParams

    def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    assert set(WORKER_GONE) == {grpc.StatusCode.UNAVAILABLE}
    assert set(BACK_PRESSURE) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert _client_error(rpc_error(grpc.StatusCode.INTERNAL, "boom"), SamplingParams()).status == 500
    assert _client_error(rpc_error(grpc.StatusCode.UNKNOWN, "boom"), SamplingParams()).status == 500
    full = _client_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"), SamplingParams())
    assert (full.status, full.retry_after_s) == (429, 1)
    guided = SamplingParams(guided=Guided("regex", "a{1000000}", param="guided_regex"))
    error = _client_error(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.guided.regex: guided decoding failed: x"),
        guided,
    )
    assert (error.status, error.param) == (400, "guided_regex")


class _HealthPeer(health_pb2_grpc.HealthServicer):
    """A gRPC server's standard health service whose answer the test sets: SERVING, NOT_SERVING,
    or no answer (the call waits until the router's deadline passes)."""

    def __init__(self) -> None:
        self.answer: str = "serving"
        self.checks = 0

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.checks += 1
        if self.answer == "silent":
            await asyncio.Event().wait()  # cancelled when the caller's deadline passes
        status = "SERVING" if self.answer == "serving" else "NOT_SERVING"
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        )


async def test_router_keeps_a_slow_worker_until_it_misses_checks_in_a_row() -> None:
    """A worker whose health check times out once (busy on a loaded host) stays in rotation; three
    in a row take it out; an answered NOT_SERVING (draining) takes it out at once, and so does a
    refused connection."""
    peer = _HealthPeer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dead = free_port()
    router = Router([f"127.0.0.1:{port}", f"127.0.0.1:{dead}"], poll_interval_s=0.05)
    try:
        slow, gone = router.workers
        slow.healthy = gone.healthy = True
        peer.answer = "silent"
        for _ in range(MISSED_CHECKS_OUT - 1):
            await router.poll_once()
            assert slow.healthy, "one missed check took the worker out"
        assert not gone.healthy, "a refused connection is a verdict"
        await router.poll_once()
        assert not slow.healthy and peer.checks == MISSED_CHECKS_OUT
        slow.healthy, slow.missed_checks = True, 1  # back in rotation with a miss behind it
        peer.answer = "not-serving"
        await router.poll_once()
        assert not slow.healthy and slow.missed_checks == 0
    finally:
        await router.close()
        await server.stop(None)


class _LoadPeer(worker_pb2_grpc.WorkerServicer):
    """A worker's Info / GetLoad as a busy engine answers them: in time, or late ("silent")."""

    def __init__(self) -> None:
        self.load_answer = "serving"
        self.loads = 0

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return worker_pb2.WorkerInfo(model_name="m", max_model_len=64, vocab_size=32)

    async def GetLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.loads += 1
        if self.load_answer == "silent":
            await asyncio.Event().wait()  # cancelled when the caller's deadline passes
        if self.load_answer == "broken":
            await context.abort(grpc.StatusCode.INTERNAL, "load accounting failed")
        return worker_pb2.Load(num_running=1)


async def test_router_keeps_a_worker_whose_load_answer_is_late() -> None:
    """A worker that answers health but whose GetLoad misses its deadline (the engine busy with
    one request's long grammar work on a loaded host) counts a missed check, as a late health
    answer does: out only after MISSED_CHECKS_OUT in a row. Another GetLoad failure is a verdict.
    (Before, one late GetLoad took every such worker out of rotation: 503s for everyone.)"""
    peer, load = _HealthPeer(), _LoadPeer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(peer, server)
    worker_pb2_grpc.add_WorkerServicer_to_server(load, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    router = Router([f"127.0.0.1:{port}"], poll_interval_s=0.05)
    try:
        (w,) = router.workers
        await router.poll_once()
        assert w.healthy and w.reported_load == 1
        load.load_answer = "silent"
        for _ in range(MISSED_CHECKS_OUT - 1):
            await router.poll_once()
            assert w.healthy, "one late GetLoad took the worker out"
        await router.poll_once()
        assert not w.healthy and load.loads == MISSED_CHECKS_OUT + 1
        load.load_answer = "serving"
        await router.poll_once()
        assert w.healthy and w.missed_checks == 0
        load.load_answer = "broken"
        await router.poll_once()
        assert not w.healthy, "a failed GetLoad is a verdict"
    finally:
        await router.close()
        await server.stop(None)


async def test_tokens_whose_text_is_held_back_make_empty_openai_chunks_only() -> None:
    """An update with new tokens and no text (the styler holds back an incomplete character) is
    a chunk of empty text in the OpenAI streams, as vLLM sends one per token: `content` "", or
    `reasoning_content` "" inside reasoning, `delta: {}` under a forced tool choice (its content
    is null), completions' `text` "". The Anthropic and Responses streams send no empty text
    event for it, and a whole response is as before."""
    from gateway.anthropic import MessageBuilder
    from gateway.pipeline import Job
    from gateway.responses_api import ResponseBuilder
    from gateway.tool_schema import ForcedToolChoice

    run, prompt = _run()
    held = ChoiceUpdate(0, prompt, num_new_tokens=2)

    def deltas(chunks: list[dict[str, Any]]) -> list[Any]:
        return [c["choices"][0]["delta"] for c in chunks]

    chat = ChatResult("r1", "m", 0, 1, logprobs=False, parallel_tool_calls=True)
    assert deltas(chat.add(held)) == [{"role": "assistant", "content": ""}, {"content": ""}]
    assert deltas(chat.add(ChoiceUpdate(0, prompt, reasoning="hmm", num_new_tokens=1))) == [
        {"reasoning_content": "hmm"}
    ]
    assert deltas(chat.add(held)) == [{"reasoning_content": ""}]
    assert deltas(chat.add(ChoiceUpdate(0, prompt, text="Hi", num_new_tokens=1))) == [{"content": "Hi"}]
    assert deltas(chat.add(held)) == [{"content": ""}]
    assert chat.add(ChoiceUpdate(0, prompt)) == []  # no tokens, no text: nothing, as before
    last = chat.add(ChoiceUpdate(0, prompt, text="\ufffd", finish_reason="length", num_new_tokens=1))
    assert deltas(last) == [{"content": "\ufffd"}] and last[0]["choices"][0]["finish_reason"] == "length"
    message = chat.response(run)["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Hi\ufffd", "hmm")

    forced = ChatResult(
        "r1", "m", 0, 1, logprobs=False, parallel_tool_calls=True, forced=ForcedToolChoice("named", "f")
    )
    assert deltas(forced.add(held)) == [{"role": "assistant", "content": None}, {}]

    # Once a tool call has begun, held-back tokens (the parser holds the call's text) add no
    # content to the message: `delta: {}`.
    tools = ChatResult("r1", "m", 0, 1, logprobs=False, parallel_tool_calls=True)
    call = ChoiceUpdate(0, prompt, tool_calls=(ToolCallDelta(0, "call_1", "f", ""),), num_new_tokens=1)
    assert deltas(tools.add(call))[-1]["tool_calls"][0]["function"]["name"] == "f"
    assert deltas(tools.add(held)) == [{}]

    text = CompletionResult("r1", "m", 0, 1, logprobs=None, echo=False)
    chunks = text.add(held)
    assert [c["choices"][0]["text"] for c in chunks] == [""]
    assert text.add(ChoiceUpdate(0, prompt)) == []

    # Continuous usage stats: every chunk, the empty ones too, carries the usage so far.
    async def updates() -> Any:
        for update in (held, held, ChoiceUpdate(0, prompt, text="\ufffd", finish_reason="stop")):
            yield update

    job = Job(run, CompletionResult("r1", "m", 0, 1, None, False, include_usage=True), updates(), True, True)
    streamed = [c async for c in job.chunks()]
    assert [c["choices"][0]["text"] for c in streamed[:-1]] == ["", "", "\ufffd"]
    assert all(c["usage"] is not None for c in streamed) and streamed[-1]["choices"] == []

    anthropic = MessageBuilder("r1", "m", ChatResult("r1", "m", 0, 1, False, True))
    assert anthropic.add(held) == []
    events = anthropic.add(ChoiceUpdate(0, prompt, text="Hi", num_new_tokens=1))
    assert [e["type"] for e in events] == ["content_block_start", "content_block_delta"]
    assert anthropic.add(held) == []
    responses = ResponseBuilder({}, {}, "m", ChatResult("r1", "m", 0, 1, False, True))
    assert responses.add(held) == []
    events = responses.add(ChoiceUpdate(0, prompt, text="Hi", num_new_tokens=1))
    assert [e["type"] for e in events][-1] == "response.output_text.delta"
    assert responses.add(held) == []
