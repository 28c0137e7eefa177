"""Structured-output request fields -> the worker's `GuidedDecoding` constraint (`Guided`).

OpenAI: `response_format` = {"type": "text"} (free), {"type": "json_object"} (any JSON object) or
{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}.
vLLM's extensions: `guided_json` (a schema object or its JSON text), `guided_regex`,
`guided_choice` (a non-empty list of strings) and `guided_grammar` (Lark), and their newer form
`structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.

A request carries at most one constraint: two are a 400 naming both fields (vLLM refuses them
too; silently picking one would give the client output it did not ask for). The schema itself is
checked by the worker, whose INVALID_ARGUMENT comes back as a 400 naming the field the client
sent (`Guided.param`, see `worker_error`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import grpc

from gateway import json_text
from gateway.downstream import Guided
from gateway.errors import APIError, invalid, one_line

# The request fields that may carry a constraint, in the order they are named in errors.
FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)

# vLLM's `structured_outputs` keys and the guided_* field each one means.
_STRUCTURED_OUTPUTS = {
    "json": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
    "json_object": "json_object",
}

# Cheap bounds checked before a worker compiles anything: compiling a grammar costs time and
# memory that grow with its text (100,000 choices took the compiler 17 s).
MAX_GUIDED_CHOICES = 1024  # strings in `guided_choice`
MAX_GUIDED_BYTES = 128 * 1024  # UTF-8 bytes of a schema, regex or grammar, or of all choices together
# A compiler's refusal is cut to its first line, at most this long (never a backtrace).
MAX_WORKER_ERROR_CHARS = 300

# OpenAI's rule for `response_format.json_schema.name`.
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def schema_text(schema: Any, param: str) -> str:
    """A JSON schema as the JSON text the worker compiles (at most `MAX_GUIDED_BYTES`)."""
    return _bounded(json.dumps(schema, ensure_ascii=False, separators=(",", ":")), param, "its JSON schema")


def _bounded(text: str, param: str, what: str) -> str:
    size = len(text.encode("utf-8"))
    if size > MAX_GUIDED_BYTES:
        raise invalid(f"'{param}': {what} is {size} bytes; at most {MAX_GUIDED_BYTES} are allowed", param)
    return text


def _response_format(value: Any) -> Guided | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise invalid("'response_format' must be an object with a 'type'", param)
    kind = value.get("type")
    allowed: set[str] = {"type"}
    guided: Guided | None
    if kind == "text":
        guided = None
    elif kind == "json_object":
        guided = Guided("json_object", param=param)
    elif kind == "json_schema":
        allowed.add("json_schema")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid(
                "'response_format.json_schema' must be an object with a 'name' and a 'schema'", param
            )
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise invalid(f"unknown field 'response_format.json_schema.{unknown[0]}'", param)
        name = spec.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise invalid(
                "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'", param
            )
        if "schema" not in spec:
            raise invalid("'response_format.json_schema.schema' is required", param)
        if not isinstance(spec["schema"], dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON schema object", param)
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise invalid("'response_format.json_schema.strict' must be a boolean", param)
        if not isinstance(spec.get("description", ""), (str, type(None))):
            raise invalid("'response_format.json_schema.description' must be a string", param)
        # strict: the worker always enforces the schema, so strict true and false behave alike.
        guided = Guided("json_schema", schema_text(spec["schema"], param), param=param)
    else:
        raise invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'", param)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise invalid(f"unknown field 'response_format.{unknown[0]}'", param)
    return guided


def _guided_json(value: Any) -> Guided:
    param = "guided_json"
    if isinstance(value, str):
        value = json_text.loads(value, param)
    if not isinstance(value, dict):
        raise invalid("'guided_json' must be a JSON schema object (or its JSON text)", param)
    return Guided("json_schema", schema_text(value, param), param=param)


def _nonempty_string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"'{param}' must be a non-empty string", param)
    return _bounded(value, param, "the text")


def _guided_choice(value: Any) -> Guided:
    param = "guided_choice"
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise invalid("'guided_choice' must be a non-empty list of strings", param)
    if len(value) > MAX_GUIDED_CHOICES:
        raise invalid(
            f"'guided_choice' has {len(value)} strings; at most {MAX_GUIDED_CHOICES} are allowed", param
        )
    _bounded("".join(value), param, "the choices together")
    return Guided("choice", choices=tuple(value), param=param)


def _structured_outputs(value: Any) -> Guided:
    param = "structured_outputs"
    given = [k for k, v in value.items() if v is not None] if isinstance(value, dict) else []
    if len(given) != 1 or given[0] not in _STRUCTURED_OUTPUTS:
        keys = ", ".join(f"'{k}'" for k in _STRUCTURED_OUTPUTS)
        raise invalid(f"'structured_outputs' must be an object with exactly one of {keys}", param)
    key = given[0]
    if key == "json_object":
        if value[key] is not True:
            raise invalid("'structured_outputs.json_object' must be true", param)
        guided = Guided("json_object")
    else:
        field = _STRUCTURED_OUTPUTS[key]
        try:
            inner = _one(field, value[key])
        except APIError as err:  # name the key the client sent, not the guided_* field it means
            raise invalid(err.message.replace(f"'{field}'", f"'structured_outputs.{key}'"), param) from None
        assert inner is not None  # only a response_format of type text is no constraint
        guided = inner
    return dataclasses.replace(guided, param=param)


def _one(name: str, value: Any) -> Guided | None:
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        return _guided_json(value)
    if name == "guided_regex":
        return Guided("regex", _nonempty_string(value, name), param=name)
    if name == "guided_choice":
        return _guided_choice(value)
    if name == "guided_grammar":
        return Guided("lark_grammar", _nonempty_string(value, name), param=name)
    return _structured_outputs(value)


def parse(values: Mapping[str, Any]) -> Guided | None:
    """The constraint of a request from its `FIELDS` values (None: absent), or None when free."""
    given = [name for name in FIELDS if values.get(name) is not None]
    if values.get("response_format") is not None and _response_format(values["response_format"]) is None:
        given.remove("response_format")  # {"type": "text"}: no constraint
    if len(given) > 1:
        names = " and ".join(f"'{n}'" for n in given)
        raise invalid(f"give at most one structured-output constraint; the request has {names}", given[1])
    if not given:
        return None
    return _one(given[0], values[given[0]])


def worker_error(exc: grpc.aio.AioRpcError, guided: Guided | None) -> APIError | None:
    """A worker's refusal of the constraint as the client should see it, or None if it is not one.

    INVALID_ARGUMENT `guided.<field>: <why>` (a schema, regex or grammar the worker cannot compile)
    is the client's mistake: a 400 naming the request field it sent. FAILED_PRECONDITION (a worker
    without the model's tokenizer cannot guide) is a 400 too, not a 501: OpenAI answers a model
    that cannot do structured outputs with a 400 invalid_request_error naming `response_format`,
    vLLM answers an unusable guided-decoding backend with a 400, and the official clients retry
    5xx answers, which would only repeat the refusal.
    """
    if guided is None:
        return None
    details = exc.details() or ""
    field, _, why = details.partition(":")
    # The worker names the field first: "guided.json_schema: ..." or "sampling.guided.regex: ...".
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "guided" in field.split("."):
        return invalid(
            f"'{guided.param}' cannot be used for guided decoding: {one_line(why, MAX_WORKER_ERROR_CHARS)}",
            guided.param,
        )
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not details.startswith("kv_source"):
        return APIError(
            400,
            f"'{guided.param}' needs guided decoding, which this deployment cannot do: "
            f"{one_line(details, MAX_WORKER_ERROR_CHARS)}",
            param=guided.param,
            code="guided_decoding_unavailable",
        )
    return None
