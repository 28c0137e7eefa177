"""The gateway's OpenAPI 3.1 description (`GET /openapi.json`), built from the same limits the
validator enforces, so the document says exactly what a request may contain.

Request bodies list every field `validation.py` accepts and set `additionalProperties: false`,
because unknown fields are refused with a 400. Fields accepted only at a neutral value
(`suffix: ""`, ...) are left out.
"""

from __future__ import annotations

from typing import Any

from gateway.limits import Limits
from gateway.structured_output import FIELDS as CONSTRAINT_FIELDS
from gateway.structured_output import MAX_GUIDED_CHOICES
from gateway.validation import MAX_BEST_OF
from services.common.sampling import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, RANGES

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}
_NAME = {"type": "string", "pattern": "\\S"}  # a name or path: something besides white space


def _num(lo: float | None = None, hi: float | None = None, exclusive_lo: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "number"}
    if lo is not None:
        out["exclusiveMinimum" if exclusive_lo else "minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def _int(lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        out["minimum"] = lo
    if hi:
        out["maximum"] = hi
    return out


def _sampling(name: str) -> dict[str, Any]:
    """A sampling field's schema from its range in services/common/sampling.py (the validator's)."""
    r = RANGES[name]
    if isinstance(r.lo, int) and isinstance(r.hi, int):
        return _int(r.lo, r.hi)
    return _num(r.lo, r.hi)


_UINT32 = 2**32 - 1
_TOKEN_ID = _int(0, _UINT32)
_TOKEN_IDS = {"type": "array", "items": _TOKEN_ID}


def _generation(limits: Limits, chat: bool) -> dict[str, Any]:
    stop_list: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}
    if limits.max_stop_strings:
        stop_list["maxItems"] = limits.max_stop_strings
    props: dict[str, Any] = {
        "model": {**_STR, "description": "the served model ('' or absent: the served model)"},
        "max_tokens": _int(1, limits.max_tokens or _UINT32),
        "temperature": _sampling("temperature"),
        "top_p": _sampling("top_p"),
        "n": _int(1, limits.max_n),
        "stop": {"anyOf": [{"type": "string", "minLength": 1}, stop_list, {"type": "null"}]},
        "seed": _int(-(2**63), 2**63 - 1),
        "presence_penalty": _sampling("presence_penalty"),
        "frequency_penalty": _sampling("frequency_penalty"),
        "top_k": _sampling("top_k"),
        "min_p": _sampling("min_p"),
        "repetition_penalty": _sampling("repetition_penalty"),
        "min_tokens": _sampling("min_tokens"),
        "ignore_eos": _BOOL,
        "stop_token_ids": _TOKEN_IDS,
        "skip_special_tokens": _BOOL,
        "include_stop_str_in_output": _BOOL,
        "stream": _BOOL,
        "stream_options": {
            "type": "object",
            "properties": {
                "include_usage": {**_BOOL, "description": "a last chunk with the whole request's usage"},
                "continuous_usage_stats": {
                    **_BOOL,
                    "description": "vLLM: every chunk carries the usage so far (completion tokens up to it)",
                },
            },
            "additionalProperties": False,
            "description": "only with stream: true",
        },
        "user": _STR,
        "logit_bias": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": _num(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),
            "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
            "description": "token id (in the vocabulary) -> bias added to its logit before sampling; "
            "logprobs are those of the unbiased logits (vLLM's default)",
        },
        "prompt_logprobs": {
            **_int(0, limits.max_logprobs),
            "description": "vLLM: the prompt tokens' logprobs with this many alternatives (not with stream)",
        },
        **_structured_output(),
        # docs/beam_search.md
        "best_of": {
            **_int(1, min(MAX_BEST_OF, limits.max_n)),
            "description": ">= n; the best n of best_of candidates (or beams), not with stream when > n",
        },
        "use_beam_search": {
            **_BOOL,
            "description": "vLLM: beam search of best_of (or n) beams; not with stream",
        },
        "length_penalty": {
            **_num(),
            "description": "vLLM beam search: score = logprob / length ** length_penalty",
        },
        "early_stopping": {
            "anyOf": [_BOOL, {"const": "never"}],
            "description": "vLLM beam search: when the search stops",
        },
    }
    if chat:
        props["max_completion_tokens"] = _int(1, limits.max_tokens or _UINT32)
        props["logprobs"] = _BOOL
        props["top_logprobs"] = {**_int(0, limits.max_logprobs), "description": "needs logprobs: true"}
    else:
        props["logprobs"] = _int(0, limits.max_logprobs)
    return props


def _structured_output() -> dict[str, Any]:
    """`response_format` and vLLM's `guided_*` fields (at most one constraint per request)."""
    json_schema = {
        "type": "object",
        "required": ["name", "schema"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "schema": {"type": "object", "description": "the JSON Schema the output matches"},
            "strict": {"type": ["boolean", "null"], "description": "the schema is always enforced"},
            "description": _STR,
        },
    }
    one = "at most one of response_format (other than text) and the guided_* fields"
    return {
        "response_format": {
            "description": f"structured output ({one})",
            "anyOf": [
                {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {"type": {"enum": ["text", "json_object"]}},
                },
                {
                    "type": "object",
                    "required": ["type", "json_schema"],
                    "additionalProperties": False,
                    "properties": {"type": {"const": "json_schema"}, "json_schema": json_schema},
                },
            ],
        },
        "guided_json": {
            "description": f"vLLM: the output matches this JSON Schema (an object or its JSON text; {one})",
            "anyOf": [{"type": "object"}, _STR],
        },
        "guided_regex": {
            "type": "string",
            "minLength": 1,
            "description": "vLLM: the output matches this regex",
        },
        "guided_choice": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_GUIDED_CHOICES,
            "items": _STR,
            "description": "vLLM: the output is exactly one of these strings",
        },
        "guided_grammar": {
            "type": "string",
            "minLength": 1,
            "description": "vLLM: the output is a sentence of this Lark grammar (llguidance's dialect)",
        },
        "structured_outputs": {
            "description": f"vLLM's newer form of the guided_* fields: exactly one key ({one})",
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
            "properties": {
                "json": {"anyOf": [{"type": "object"}, _STR]},
                "regex": {"type": "string", "minLength": 1},
                "choice": {"type": "array", "minItems": 1, "maxItems": MAX_GUIDED_CHOICES, "items": _STR},
                "grammar": {"type": "string", "minLength": 1},
                "json_object": {"const": True},
            },
        },
    }


def _refused_combinations(chat: bool) -> dict[str, Any]:
    """What validation refuses across fields: two structured-output constraints (`response_format`
    of type text is none), `stream_options` without `stream: true`, (chat) `top_logprobs`
    without `logprobs: true`, and `prompt_logprobs` with `stream: true`."""
    constraining = {
        "properties": {"response_format": {"properties": {"type": {"enum": ["json_object", "json_schema"]}}}}
    }
    pairs = []
    for i, first in enumerate(CONSTRAINT_FIELDS):
        for second in CONSTRAINT_FIELDS[i + 1 :]:
            pair: dict[str, Any] = {"required": [first, second]}
            if first == "response_format":
                pair.update(constraining)
            pairs.append(pair)
    needs_true = [("stream_options", "stream")] + ([("top_logprobs", "logprobs")] if chat else [])
    for field, flag in needs_true:
        pairs.append({"required": [field], "properties": {flag: {"not": {"const": True}}}})
    pairs.append({"required": ["prompt_logprobs", "stream"], "properties": {"stream": {"const": True}}})
    return {"not": {"anyOf": pairs}}


def _tool_choice() -> dict[str, Any]:
    named = {
        "type": "object",
        "required": ["type", "function"],
        "additionalProperties": False,
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": _STR}},
        },
    }
    return {
        "description": "none | auto (default with tools) | required (at least one call) | a named function "
        "(that call); required and named guide the output, so they exclude response_format and guided_*",
        "anyOf": [{"enum": ["none", "auto", "required"]}, named],
    }


def _message() -> dict[str, Any]:
    part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": _STR},
    }
    call = {
        "type": "object",
        "required": ["function"],
        "properties": {
            "id": _STR,
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": _STR, "arguments": {"anyOf": [_STR, {"type": "object"}]}},
            },
        },
    }
    return {
        "type": "object",
        "required": ["role"],
        "description": "an OpenAI chat message; other keys are passed to the chat template",
        "properties": {
            "role": {"type": "string", "minLength": 1},
            "content": {"anyOf": [_STR, {"type": "array", "items": part}, {"type": "null"}]},
            "name": _STR,
            "tool_calls": {"type": "array", "items": call},
            "tool_call_id": _STR,
            "reasoning_content": _STR,
        },
    }


def _tools(limits: Limits) -> dict[str, Any]:
    tool = {
        "type": "object",
        "required": ["function"],
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "description": _STR,
                    "parameters": {"type": ["object", "null"]},
                },
            },
        },
    }
    out: dict[str, Any] = {"type": "array", "items": tool}
    if limits.max_tools:
        out["maxItems"] = limits.max_tools
    return out


def _template_options() -> dict[str, Any]:
    return {
        "chat_template": _STR,
        "chat_template_kwargs": {"type": "object"},
        "add_generation_prompt": _BOOL,
        "continue_final_message": _BOOL,
    }


def _schemas(limits: Limits) -> dict[str, Any]:
    most = limits.max_sequences_per_request  # prompts x n: the prompts alone at n = 1
    prompt = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": most, "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1, "items": _TOKEN_ID},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": most,
                "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID},
            },
        ]
    }
    messages = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ChatMessage"}}
    return {
        "ChatMessage": _message(),
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["messages"],
            "additionalProperties": False,
            **_refused_combinations(chat=True),
            "properties": {
                **_generation(limits, chat=True),
                "messages": messages,
                "tools": _tools(limits),
                "tool_choice": _tool_choice(),
                "parallel_tool_calls": _BOOL,
                "documents": {"type": "array", "items": {"type": "object"}},
                **_template_options(),
            },
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            **_refused_combinations(chat=False),
            "properties": {
                **_generation(limits, chat=False),
                "prompt": prompt,
                "echo": _BOOL,
                "add_special_tokens": _BOOL,
            },
        },
        "TokenizeRequest": {
            "type": "object",
            "additionalProperties": False,
            "description": "exactly one of prompt or messages; tools and template options need messages",
            "oneOf": [
                {
                    "required": ["prompt"],
                    "not": {
                        "anyOf": [
                            {"required": [name]}
                            for name in ("messages", "tools", "chat_template", "chat_template_kwargs")
                        ]
                    },
                },
                {"required": ["messages"], "not": {"required": ["prompt"]}},
            ],
            "properties": {
                "model": _STR,
                "prompt": _STR,
                "messages": messages,
                "tools": _tools(limits),
                "add_special_tokens": _BOOL,
                "return_token_strs": _BOOL,
                **_template_options(),
            },
        },
        "EmbeddingRequest": {
            "type": "object",
            "required": ["input"],
            "additionalProperties": False,
            "description": "needs workers started with --task embed (a 400 naming `model` otherwise); "
            "each input at most the context length in tokens, token ids below the vocabulary size, "
            "`dimensions` at most the model's hidden size",
            "properties": {
                "model": {**_STR, "description": "the served model ('' or absent: the served model)"},
                "input": {
                    "anyOf": [
                        {"type": "string", "minLength": 1},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": most,
                            "items": {"type": "string", "minLength": 1},
                        },
                        {"type": "array", "minItems": 1, "items": _TOKEN_ID},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": most,
                            "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID},
                        },
                    ]
                },
                "dimensions": {
                    **_int(1),
                    "description": "Matryoshka truncation: the first values, renormalised",
                },
                "encoding_format": {
                    "enum": ["float", "base64"],
                    "description": "base64: little-endian float32",
                },
                "user": _STR,
            },
        },
        "DetokenizeRequest": {
            "type": "object",
            "required": ["tokens"],
            "additionalProperties": False,
            "properties": {"model": _STR, "tokens": _TOKEN_IDS},
        },
        # vLLM's dynamic LoRA routes (gateway/routes/lora_routes.py, docs/lora.md)
        "LoadLoRAAdapterRequest": {
            "type": "object",
            "required": ["lora_name", "lora_path"],
            "properties": {"lora_name": _NAME, "lora_path": _NAME},
        },
        "UnloadLoRAAdapterRequest": {
            "type": "object",
            "required": ["lora_name"],
            "properties": {"lora_name": _NAME},
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": _STR,
                        "type": _STR,
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
    }


_ERROR_CODES = {
    "400": "invalid request (the message and `param` name the field)",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "body larger than --max-request-bytes",
    "429": "queue full or rate limit reached (see Retry-After)",
    "503": "no worker or styler available, or the gateway is draining (see Retry-After)",
    "504": "the request's deadline passed",
}


def _lora_route(schema: str, summary: str) -> dict[str, Any]:
    ok = {
        "description": "done (vLLM's plain-text answer)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
            },
            "responses": _responses(ok, ("400", "401", "404", "413", "503")),
        }
    }


def _responses(ok: dict[str, Any], codes: tuple[str, ...] = tuple(_ERROR_CODES)) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out: dict[str, Any] = {"200": ok}
    for code in codes:
        out[code] = {"description": _ERROR_CODES[code], **err}
    out["default"] = {"description": "another error, in the same envelope", **err}
    return out


def _post(schema: str, summary: str, streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
            },
            "responses": _responses({"description": "the result", "content": content}),
        }
    }


def openapi_document(limits: Limits) -> dict[str, Any]:
    json_ok = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tandem gateway",
            "version": "0.1.0",
            "description": "OpenAI-compatible API of tandem. Send `Authorization: Bearer <key>` when the "
            "gateway has API keys, and optionally `X-Request-Timeout: <seconds>`.",
        },
        "components": {
            "schemas": _schemas(limits),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/chat/completions": _post("ChatCompletionRequest", "chat completion", streams=True),
            "/v1/completions": _post("CompletionRequest", "text completion", streams=True),
            "/tokenize": _post("TokenizeRequest", "tokenize a prompt or a chat", streams=False),
            "/detokenize": _post("DetokenizeRequest", "token ids to text", streams=False),
            "/v1/embeddings": _post(
                "EmbeddingRequest", "embeddings (workers with --task embed)", streams=False
            ),
            "/v1/load_lora_adapter": _lora_route(
                "LoadLoRAAdapterRequest", "load a LoRA adapter (PEFT directory) on every worker"
            ),
            "/v1/unload_lora_adapter": _lora_route("UnloadLoRAAdapterRequest", "unload a LoRA adapter"),
            "/v1/models": {
                "get": {"summary": "the served model", "responses": _responses(json_ok, ("401",))}
            },
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "one model",
                    "parameters": [
                        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": _responses(json_ok, ("401", "404")),
                }
            },
            "/health": {
                "get": {
                    "summary": "200 when a styler and a worker are serving; 503 otherwise or while draining",
                    "security": [],
                    "responses": {"200": json_ok, "503": json_ok},
                }
            },
        },
    }
