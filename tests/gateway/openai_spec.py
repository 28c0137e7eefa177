"""OpenAI's published OpenAPI schemas (tests/data/openai-openapi) as JSON Schema validators.

The specification is OpenAPI 3.1, whose Schema Objects are JSON Schema 2020-12, but many of them
still carry the OpenAPI 3.0 keyword `nullable: true`, which a 3.1 / JSON Schema validator ignores
(it would refuse the `null` OpenAI itself sends, e.g. a stream chunk's `finish_reason`). Loading
rewrites each such schema to `anyOf: [<the schema>, {type: null}]`, OpenAI's intent. Its
`discriminator`s name no `mapping`, and their values ("user", "function") are not schema names, so
OpenAPI's implicit mapping cannot resolve them: they are dropped and `oneOf` alone decides, as it
does in JSON Schema. Everything else is validated as published, by `openapi-schema-validator`'s
OAS 3.1 validator.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "openai-openapi" / "openapi.subset.json"
_URI = "urn:openai-openapi"


def to_json_schema(node: Any) -> Any:
    """A copy of `node` with every `nullable: true` schema turned into `anyOf [schema, null]` and
    without `discriminator`s."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k not in ("nullable", "discriminator")}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    # Only the schemas are converted: `nullable` elsewhere (there is none) would mean nothing.
    doc["components"]["schemas"] = to_json_schema(doc["components"]["schemas"])
    # The spec gives no schema for a streamed completion; OpenAI streams CreateCompletionResponse
    # objects whose `finish_reason` is null until a choice ends and whose `usage` is null but in
    # the last chunk (as the chat chunk schema and ChatCompletionStreamOptions say).
    chunk = copy.deepcopy(doc["components"]["schemas"]["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    doc["components"]["schemas"]["x-tandem-CompletionStreamChunk"] = chunk
    return doc


@cache
def _registry() -> Registry:  # type: ignore[type-arg]
    return Registry().with_resource(
        _URI, Resource.from_contents(document(), default_specification=DRAFT202012)
    )


@cache
def validator(name: str) -> OAS31Validator:
    """A validator of `#/components/schemas/<name>`."""
    assert name in document()["components"]["schemas"], name
    return OAS31Validator({"$ref": f"{_URI}#/components/schemas/{name}"}, registry=_registry())


def errors(name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks schema `name` ("path: message"), empty when it is valid."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in validator(name).iter_errors(instance)
    ]


def check(name: str, instance: Any) -> None:
    """Fail with every reason when `instance` is not a valid `name`."""
    problems = errors(name, instance)
    assert not problems, (
        f"not a valid {name}:\n  " + "\n  ".join(problems) + f"\n{json.dumps(instance)[:2000]}"
    )


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of an OpenAI stream; asserts it ends with `data: [DONE]`."""
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events and events[-1] == "data: [DONE]", f"stream does not end with [DONE]: {text[-300:]!r}"
    out = []
    for block in events[:-1]:
        assert block.startswith("data: "), block
        out.append(json.loads(block.removeprefix("data: ")))
    return out


def checked_stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST `body` with `stream: true` to `url + path` (/v1/chat/completions or /v1/completions):
    its chunks, each valid under its OpenAI schema (the completion chunk with a nullable
    finish_reason, `x-tandem-CompletionStreamChunk`)."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as reply:
        text = reply.read().decode()
    assert reply.status_code == 200, text
    name = (
        "CreateChatCompletionStreamResponse"
        if path == "/v1/chat/completions"
        else "x-tandem-CompletionStreamChunk"
    )
    chunks = parse_sse(text)
    for chunk in chunks:
        check(name, chunk)
    return chunks
