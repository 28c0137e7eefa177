"""Structured outputs and forced tool calls without a worker: request validation -> GuidedDecoding,
the tool-call JSON schema, the incremental JSON / tool-call parsers and the response shapes."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import grpc
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clients import _sampling_to_proto
from gateway.downstream import Guided
from gateway.errors import APIError
from gateway.execution import ChoiceUpdate, PromptRun, RequestRun
from gateway.forced_tool_calls import NamedCall, RequiredCalls
from gateway.json_stream import JsonLexer, canonical
from gateway.responses import ChatResult
from gateway.rpc import chat_body, completion_body
from gateway.structured_output import worker_error
from gateway.tool_schema import ForcedToolChoice, required_schema
from gateway.validation import parse_chat, parse_completion
from services.common.sampling import SamplingParams
from tandem.v1 import common_pb2, inference_pb2

MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _error(fn: Any, body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as err:
        fn(body)
    assert err.value.status == 400, err.value.message
    return err.value


# ---- request validation -> Guided ------------------------------------------------------------


def test_response_format_maps_to_guided_decoding() -> None:
    assert (
        parse_chat({"messages": MESSAGES, "response_format": {"type": "text"}}).params.sampling.guided is None
    )
    g = parse_chat({"messages": MESSAGES, "response_format": {"type": "json_object"}}).params.sampling.guided
    assert g == Guided("json_object", param="response_format")
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    g = parse_chat({"messages": MESSAGES, "response_format": rf}).params.sampling.guided
    assert g is not None and g.kind == "json_schema" and json.loads(g.value) == PERSON
    assert g.param == "response_format"
    # completions take the same fields (vLLM)
    g = parse_completion({"prompt": "x", "response_format": rf}).params.sampling.guided
    assert g is not None and json.loads(g.value) == PERSON


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema' is required"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "JSON schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "extra"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "yaml"}, "type"),
        ({"type": "json_object", "schema": {}}, "schema"),
        ("json", "object"),
    ],
)
def test_bad_response_format_is_400_naming_it(body: Any, words: str) -> None:
    for parse, base in ((parse_chat, {"messages": MESSAGES}), (parse_completion, {"prompt": "x"})):
        err = _error(parse, {**base, "response_format": body})
        assert err.param == "response_format" and words in err.message, err.message


def test_vllm_guided_fields() -> None:
    def guided(**fields: Any) -> Guided | None:
        return parse_chat({"messages": MESSAGES, **fields}).params.sampling.guided

    g = guided(guided_json=PERSON)
    assert g is not None and (g.kind, json.loads(g.value), g.param) == ("json_schema", PERSON, "guided_json")
    g = guided(guided_json=json.dumps(PERSON))
    assert g is not None and json.loads(g.value) == PERSON
    assert guided(guided_regex="[a-z]+") == Guided("regex", "[a-z]+", param="guided_regex")
    assert guided(guided_choice=["yes", "no"]) == Guided(
        "choice", choices=("yes", "no"), param="guided_choice"
    )
    assert guided(guided_grammar='start: "a"') == Guided("lark_grammar", 'start: "a"', param="guided_grammar")
    # vLLM's newer spelling of the same constraints
    so = {
        "json": (PERSON, Guided("json_schema", json.dumps(PERSON, separators=(",", ":")))),
        "regex": ("a+", Guided("regex", "a+")),
        "choice": (["x"], Guided("choice", choices=("x",))),
        "grammar": ("start: x", Guided("lark_grammar", "start: x")),
        "json_object": (True, Guided("json_object")),
    }
    for key, (value, want) in so.items():
        assert guided(structured_outputs={key: value}) == dataclasses.replace(
            want, param="structured_outputs"
        )
    err = _error(parse_chat, {"messages": MESSAGES, "structured_outputs": {"choice": []}})
    assert err.param == "structured_outputs" and "'structured_outputs.choice'" in err.message
    for bad in ({}, {"regex": "a", "choice": ["a"]}, {"json_object": False}, {"structural_tag": "x"}, ["a"]):
        assert (
            _error(parse_chat, {"messages": MESSAGES, "structured_outputs": bad}).param
            == "structured_outputs"
        )
    # the neutral values mean "no constraint"
    assert guided(guided_json=None, response_format={"type": "text"}) is None
    assert guided(response_format={"type": "text"}, guided_regex="a") == Guided(
        "regex", "a", param="guided_regex"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": [1]}, "guided_json"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_grammar": 3}, "guided_grammar"),
    ],
)
def test_bad_guided_fields_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert _error(parse_chat, {"messages": MESSAGES, **fields}).param == param
    assert _error(parse_completion, {"prompt": "x", **fields}).param == param


def test_two_constraints_are_refused_naming_both() -> None:
    err = _error(
        parse_chat,
        {"messages": MESSAGES, "response_format": {"type": "json_object"}, "guided_regex": "a+"},
    )
    assert "'response_format'" in err.message and "'guided_regex'" in err.message
    err = _error(parse_completion, {"prompt": "x", "guided_choice": ["a"], "guided_grammar": "start: x"})
    assert "'guided_choice'" in err.message and "'guided_grammar'" in err.message
    err = _error(
        parse_chat,
        {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "guided_json": PERSON},
    )
    assert err.param == "tool_choice" and "'guided_json'" in err.message
    # tool_choice auto is no constraint: response_format applies to the text
    req = parse_chat({"messages": MESSAGES, "tools": TOOLS, "response_format": {"type": "json_object"}})
    assert req.forced_tool is None and req.params.sampling.guided is not None


def test_tool_choice_named_guides_with_the_functions_parameters() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = parse_chat({"messages": MESSAGES, "tools": TOOLS, "tool_choice": named})
    assert req.tool_choice == "named" and req.forced_tool == ForcedToolChoice("named", "get_weather")
    g = req.params.sampling.guided
    assert g is not None and json.loads(g.value) == WEATHER and g.param == "tools[0].function.parameters"
    req = parse_chat(
        {
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        }
    )
    assert req.params.sampling.guided is not None and json.loads(req.params.sampling.guided.value) == {
        "type": "object"
    }
    for bad in (
        {"type": "function", "function": {"name": "nope"}},
        {"type": "function"},
        {"type": "tool", "function": {"name": "get_time"}},
        "sometimes",
    ):
        assert (
            _error(parse_chat, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": bad}).param
            == "tool_choice"
        )
    assert _error(parse_chat, {"messages": MESSAGES, "tool_choice": "required"}).param == "tool_choice"
    assert _error(parse_chat, {"messages": MESSAGES, "tool_choice": named}).param == "tool_choice"


# ---- the tool-call schema ---------------------------------------------------------------------


def test_required_schema_accepts_exactly_calls_of_the_tools() -> None:
    req = parse_chat({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert req.forced_tool == ForcedToolChoice("required")
    assert req.params.sampling.guided is not None and req.params.sampling.guided.param == "tools"
    schema = json.loads(req.params.sampling.guided.value)
    assert schema == required_schema(TOOLS, True)
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    good = [
        [{"name": "get_weather", "parameters": {"city": "Paris"}}],
        [
            {"name": "get_time", "parameters": {}},
            {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}},
        ],
    ]
    bad = [
        [],
        [{"name": "get_weather", "parameters": {}}],  # city is required
        [{"name": "launch", "parameters": {}}],
        [{"name": "get_time"}],
        [{"name": "get_time", "parameters": {}, "why": 1}],
        {"name": "get_time", "parameters": {}},
    ]
    assert all(validator.is_valid(v) for v in good)
    assert not any(validator.is_valid(v) for v in bad)
    single = required_schema(TOOLS, parallel_tool_calls=False)
    assert single["maxItems"] == 1 and not jsonschema.Draft202012Validator(single).is_valid(good[1])


def test_required_schema_moves_defs_to_the_root() -> None:
    point: dict[str, Any] = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    tools: list[dict[str, Any]] = [
        {
            "type": "function",
            "function": {
                "name": "move",
                "parameters": {
                    "type": "object",
                    "properties": {"to": {"$ref": "#/$defs/Point"}},
                    "required": ["to"],
                    "$defs": {"Point": point},
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "look",
                "parameters": {
                    "type": "object",
                    "properties": {"at": {"$ref": "#/$defs/Point"}},
                    "$defs": {"Point": point},
                },
            },
        },
    ]
    schema = required_schema(tools, True)
    assert schema["$defs"] == {"Point": point}
    assert "$defs" in tools[0]["function"]["parameters"]  # the request's own schema is untouched
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid([{"name": "move", "parameters": {"to": {"x": 1}}}])
    assert not validator.is_valid([{"name": "move", "parameters": {"to": {"y": 1}}}])
    tools[1]["function"]["parameters"]["$defs"] = {"Point": {"type": "string"}}
    err = _error(parse_chat, {"messages": MESSAGES, "tools": tools, "tool_choice": "required"})
    assert err.param == "tools" and "Point" in err.message


# ---- incremental JSON -------------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _splits(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
        if len(text) > 1
        else []
    )
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(value=_JSON, ascii_=st.booleans(), indent=st.sampled_from([None, 0, 2]), seed=st.integers(0, 10**6))
def test_lexer_pieces_reserialise_as_json_dumps(
    value: Any, ascii_: bool, indent: int | None, seed: int
) -> None:
    # the model may write any valid JSON (escapes, \\u pairs, whitespace); the pieces, however
    # split, always add up to json.dumps of the parsed value
    if not isinstance(value, (dict, list)):
        value = [value]  # a top-level scalar only ends with the text (see finish())
    text = json.dumps(value, ensure_ascii=ascii_, indent=indent)
    lexer = JsonLexer()
    pieces = []
    for part in _splits(text, random.Random(seed)):
        pieces += [canonical(t) for t in lexer.feed(part)]
    pieces += [canonical(t) for t in lexer.finish()]
    assert "".join(pieces) == json.dumps(json.loads(text), ensure_ascii=False)


def test_lexer_refuses_what_is_not_json() -> None:
    for bad in ("{'a': 1}", '["\\x"]', "[tru e]", "[1]x", '["a\nb"]'):
        with pytest.raises(ValueError):
            lexer = JsonLexer()
            lexer.feed(bad)
            lexer.finish()


# ---- forced tool-call parsers ----------------------------------------------------------------


def _ids() -> Any:
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


def _collect(deltas: list[Any]) -> list[dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        assert bool(d.id) == (d.index not in [e.index for e in deltas[: deltas.index(d)]]), (
            "id on the first delta only"
        )
        call["id"] += d.id
        call["name"] += d.name
        call["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


CALLS = [
    {
        "name": "get_weather",
        "parameters": {"city": 'Zürich "Z"\n', "unit": "c", "n": [1.50, -0, 2e3, True, None]},
    },
    {"name": "get_time", "parameters": {}},
    {"parameters": {"city": "\U0001f600 x"}, "name": "get_weather"},  # parameters before the name
]


@pytest.mark.parametrize("indent", [None, 1])
@pytest.mark.parametrize("ascii_", [False, True])
def test_required_parser_every_split(indent: int | None, ascii_: bool) -> None:
    text = json.dumps(CALLS, indent=indent, ensure_ascii=ascii_)
    want = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in CALLS]
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else []):
            if not pieces:
                continue
            parser = RequiredCalls(_ids())
            deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
            calls = _collect(deltas)
            assert [(c["name"], c["arguments"]) for c in calls] == want
            assert [c["id"] for c in calls] == ["call_0", "call_1", "call_2"]
            assert parser.complete and not parser.broken


def test_required_parser_announces_a_name_as_soon_as_it_is_complete() -> None:
    parser = RequiredCalls(_ids())
    assert parser.feed('[{"name": "get_wea') == []
    first = parser.feed('ther", "parameters": {"ci')
    assert [(d.index, d.id, d.name) for d in first] == [(0, "call_0", "get_weather")]
    assert first[0].arguments == '{"ci'
    assert [(d.id, d.arguments) for d in parser.feed('ty": "Par')] == [("", 'ty": "Par')]
    assert not parser.complete
    parser.feed('is"}}]')
    assert parser.complete


def test_required_parser_truncated_and_garbage() -> None:
    parser = RequiredCalls(_ids())
    deltas = parser.feed('[{"name": "get_time", "parameters": {"a": 1') + parser.finish()
    # cut off (max_tokens): what was generated is reported, and the call is not complete
    assert _collect(deltas) == [{"id": "call_0", "name": "get_time", "arguments": '{"a": 1'}]
    assert not parser.complete
    parser = RequiredCalls(_ids())
    assert parser.feed("Sure! [") == [] and parser.broken
    assert parser.feed('{"name": "x", "parameters": {}}]') == []


def test_named_call_streams_the_text_as_arguments() -> None:
    call = NamedCall("get_weather", _ids())
    deltas = call.feed('{"city"') + call.feed("") + call.feed(': "Oslo"}') + call.finish()
    assert _collect(deltas) == [{"id": "call_0", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    empty = NamedCall("f", _ids())
    assert _collect(empty.finish()) == [{"id": "call_0", "name": "f", "arguments": ""}]


# ---- response shapes --------------------------------------------------------------------------


def _run_chat(
    forced: ForcedToolChoice, texts: list[list[str]], finishes: list[str]
) -> tuple[list[Any], dict[str, Any]]:
    """Stream chunks and the whole response of the same updates (n = len(texts))."""
    prompt = PromptRun(token_ids=(1, 2), text="p")
    n = len(texts)

    def updates() -> list[ChoiceUpdate]:
        out = []
        for step in range(max(len(t) for t in texts)):
            for i, pieces in enumerate(texts):
                if step < len(pieces):
                    finish = finishes[i] if step == len(pieces) - 1 else None
                    out.append(ChoiceUpdate(index=i, prompt=prompt, text=pieces[step], finish_reason=finish))
        return out

    streamed = ChatResult("r", "m", 0, n, logprobs=False, parallel_tool_calls=True, forced=forced)
    chunks = [c for u in updates() for c in streamed.add(u)]
    whole = ChatResult("r", "m", 0, n, logprobs=False, parallel_tool_calls=True, forced=forced)
    for u in updates():
        whole.add(u)
    return chunks, whole.response(RequestRun("r", [prompt]))


def _streamed_calls(chunks: list[Any], index: int) -> tuple[list[dict[str, str]], str | None]:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["index"] != index:
                continue
            assert c["delta"].get("content") is None
            for d in c["delta"].get("tool_calls", []):
                if d["index"] not in calls:  # OpenAI's first delta of a call
                    assert d["type"] == "function" and d["id"].startswith("call_")
                    assert set(d["function"]) == {"name", "arguments"}
                    calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
            finish = c["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], finish


def test_named_choice_response_and_stream_agree() -> None:
    texts = [['{"ci', 'ty": "Os', 'lo"}'], ['{"city": "Rome"}'], ['{"city": "Li']]
    chunks, body = _run_chat(ForcedToolChoice("named", "get_weather"), texts, ["stop", "stop", "length"])
    for i, choice in enumerate(body["choices"]):
        message = choice["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1
        call = message["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert call["function"]["arguments"] == "".join(texts[i])
        streamed, finish = _streamed_calls(chunks, i)
        assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", "".join(texts[i]))]
        assert finish == choice["finish_reason"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop", "length"]


def test_required_choice_response_and_stream_agree() -> None:
    full = json.dumps(CALLS[:2])
    texts = [[full[:7], full[7:30], full[30:]], [full[:20]]]
    chunks, body = _run_chat(ForcedToolChoice("required"), texts, ["stop", "length"])
    first, truncated = body["choices"]
    assert first["finish_reason"] == "tool_calls" and truncated["finish_reason"] == "length"
    calls = first["message"]["tool_calls"]
    assert first["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (c["name"], c["parameters"]) for c in CALLS[:2]
    ]
    assert [c["function"]["arguments"] for c in calls] == [
        json.dumps(c["parameters"], ensure_ascii=False) for c in CALLS[:2]
    ]
    for i, choice in enumerate(body["choices"]):
        streamed, finish = _streamed_calls(chunks, i)
        assert [(s["name"], s["arguments"]) for s in streamed] == [
            (c["function"]["name"], c["function"]["arguments"])
            for c in choice["message"].get("tool_calls", [])
        ]
        assert finish == choice["finish_reason"]


# ---- worker errors, the worker request and the gRPC API ----------------------------------------


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def test_worker_refusals_name_the_request_field() -> None:
    guided = Guided("json_schema", "{}", param="response_format")
    err = worker_error(
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "guided.json_schema: bad type 'foo'"), guided
    )
    assert (
        err is not None
        and (err.status, err.param) == (400, "response_format")
        and "bad type 'foo'" in err.message
    )
    err = worker_error(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "guided: no tokenizer"), guided)
    assert err is not None and (err.status, err.param, err.code) == (
        400,
        "response_format",
        "guided_decoding_unavailable",
    )
    err = worker_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.guided.regex: bad"), guided)
    assert err is not None and err.param == "response_format" and err.message.endswith(": bad")
    # not about the constraint: the usual mapping applies
    assert worker_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: too big"), guided) is None
    assert (
        worker_error(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "kv_source.fingerprint: x"), guided)
        is None
    )
    assert worker_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "guided.regex: x"), None) is None


def test_sampling_carries_the_constraint_to_the_worker() -> None:
    cases = {
        Guided("json_object"): common_pb2.GuidedDecoding(json_object=True),
        Guided("json_schema", '{"type":"object"}'): common_pb2.GuidedDecoding(
            json_schema='{"type":"object"}'
        ),
        Guided("regex", "a+"): common_pb2.GuidedDecoding(regex="a+"),
        Guided("choice", choices=("a", "b")): common_pb2.GuidedDecoding(
            choice=common_pb2.StringList(values=["a", "b"])
        ),
        Guided("lark_grammar", "start: x"): common_pb2.GuidedDecoding(lark_grammar="start: x"),
    }
    for guided, want in cases.items():
        assert _sampling_to_proto(SamplingParams(guided=guided)).guided == want
    assert not _sampling_to_proto(SamplingParams()).HasField("guided")


def test_grpc_options_guided_is_the_http_field() -> None:
    def chat(guided: common_pb2.GuidedDecoding) -> Guided | None:
        request = inference_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", text="hi")],
            options=inference_pb2.GenerationOptions(guided=guided),
        )
        return parse_chat(chat_body(request, False)).params.sampling.guided

    g = chat(common_pb2.GuidedDecoding(json_schema=json.dumps(PERSON)))
    assert g is not None and json.loads(g.value) == PERSON
    assert chat(common_pb2.GuidedDecoding(json_object=True)) == Guided("json_object", param="response_format")
    assert chat(common_pb2.GuidedDecoding(regex="a+")) == Guided("regex", "a+", param="guided_regex")
    choice = common_pb2.GuidedDecoding(choice=common_pb2.StringList(values=["x", "y"]))
    assert chat(choice) == Guided("choice", choices=("x", "y"), param="guided_choice")
    completion = inference_pb2.CompletionRequest(
        text="x",
        options=inference_pb2.GenerationOptions(guided=common_pb2.GuidedDecoding(lark_grammar="start: x")),
    )
    assert parse_completion(completion_body(completion, True)).params.sampling.guided == Guided(
        "lark_grammar", "start: x", param="guided_grammar"
    )
    with pytest.raises(APIError):
        chat(common_pb2.GuidedDecoding())


def test_openapi_documents_the_new_fields() -> None:
    from gateway.limits import DEFAULT_LIMITS
    from gateway.openapi import openapi_document

    components = openapi_document(DEFAULT_LIMITS)["components"]

    def validator(name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": components}
        )

    chat, completion = validator("ChatCompletionRequest"), validator("CompletionRequest")
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    bodies: list[dict[str, Any]] = [
        {"messages": MESSAGES, "response_format": rf},
        {"messages": MESSAGES, "response_format": {"type": "json_object"}},
        {"messages": MESSAGES, "guided_json": PERSON},
        {"messages": MESSAGES, "guided_json": json.dumps(PERSON)},
        {"messages": MESSAGES, "guided_regex": "a+"},
        {"messages": MESSAGES, "guided_choice": ["a", "b"]},
        {"messages": MESSAGES, "guided_grammar": "start: x"},
        {"messages": MESSAGES, "structured_outputs": {"choice": ["a", "b"]}},
        {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        },
    ]
    for body in bodies:
        chat.validate(body)
        parse_chat(body)  # what the document accepts, the gateway accepts
    completion.validate({"prompt": "x", "response_format": rf})
    for bad in (
        {"messages": MESSAGES, "response_format": {"type": "yaml"}},
        {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
        {"messages": MESSAGES, "guided_choice": []},
        {"messages": MESSAGES, "tool_choice": "sometimes"},
    ):
        assert not chat.is_valid(bad), bad
