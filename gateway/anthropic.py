"""Anthropic's Messages API as a thin translator onto the chat pipeline.

    Anthropic request --to_chat_body--> OpenAI chat body --parse_chat--> the chat pipeline
    pipeline updates --MessageBuilder--> an Anthropic message, or its typed stream events

Validation is the chat route's own (`parse_chat`): the translation only reshapes fields and
refuses what has no counterpart here (documents, server tools, ...) with a 400 naming the field.
`image` blocks become chat `image_url` parts (gateway/media.py, docs/multimodal.md).
Errors leave in Anthropic's envelope (`{"type": "error", "error": {"type", "message"}}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import APIError
from gateway.execution import ChoiceUpdate, RequestRun
from gateway.media import check_image_url
from gateway.output_segments import Opened, OutputSegments
from gateway.responses import ChatResult

# Request fields the translation understands; any other is refused (nothing is silently ignored).
_FIELDS = {
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "tools", "tool_choice",
    "metadata", "thinking", "service_tier", "output_config", "cache_control", "speed",
    # not in Anthropic's current API, still sent by older clients (and accepted by vLLM)
    "temperature", "top_p", "top_k",
}  # fmt: skip
_COUNT_FIELDS = {
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "cache_control",
    "output_config",
}
# Accepted only at their neutral value (tandem has one region, one speed, no containers).
_NEUTRAL = {"inference_geo": None, "container": None, "diagnostics": None, "speed": "standard"}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(err: APIError) -> dict[str, Any]:
    """Anthropic's error envelope for an APIError (the field, if any, is named in the message)."""
    message = err.message
    if err.param and err.param not in message:
        message = f"{message} (field: {err.param})"
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(err.status, "api_error"), "message": message}}


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def _text_of(blocks: Any, where: str) -> str:
    """A string, or a list of text blocks joined (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _invalid(f"'{where}' must be a string or a list of text blocks", where)
    parts = []
    for j, block in enumerate(blocks):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise _invalid(
                f"'{where}[{j}]' must be a text block ({{'type': 'text', 'text': ...}})", f"{where}[{j}]"
            )
        parts.append(block["text"])
    return "\n".join(parts)


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _image_part(block: dict[str, Any], i: int, j: int) -> dict[str, Any]:
    """An `image` block as chat's `image_url` part (the same media path from there). Anthropic
    names a block's fields with dots (`messages.0.content.1.source`)."""
    where = f"messages.{i}.content.{j}.source"
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid(f"'{where}' must be an object", where)
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in _IMAGE_TYPES:
            raise _invalid(
                f"'{where}.media_type' must be one of {', '.join(_IMAGE_TYPES)}", f"{where}.media_type"
            )
        if not isinstance(data, str) or not data:
            raise _invalid(f"'{where}.data' must be a non-empty base64 string", f"{where}.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str):
            raise _invalid(f"'{where}.url' must be a string", f"{where}.url")
        check_image_url(given, f"{where}.url", f"{where}.url")
        url = given
    elif kind == "file":
        raise _invalid(f"'{where}': file sources are not supported (there is no Files API)", f"{where}.type")
    else:
        raise _invalid(f"'{where}.type' must be 'base64' or 'url'", f"{where}.type")
    return {"type": "image_url", "image_url": {"url": url}}


def _message(i: int, message: Any, images: list[str]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI chat messages (tool results become `tool` messages); the
    names of its image blocks, in order, are appended to `images`."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _invalid(f"'{where}' must be an object", where)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _invalid(f"'{where}.role' must be 'user' or 'assistant'", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _invalid(f"'{where}.content' must be a string or a list of content blocks", f"{where}.content")
    parts: list[dict[str, Any]] = []  # text and image parts, in order
    thinking: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_messages: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bwhere = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image_part(block, i, j))
            images.append(f"messages.{i}.content.{j}.source")
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _invalid(f"'{bwhere}' needs a string 'id' and 'name'", bwhere)
            if not isinstance(block.get("input", {}), dict):
                raise _invalid(f"'{bwhere}.input' must be an object", f"{bwhere}.input")
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            tool_calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _invalid(f"'{bwhere}.tool_use_id' must be a string", f"{bwhere}.tool_use_id")
            text = _text_of(block.get("content", ""), f"{bwhere}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            tool_messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            if kind == "thinking" and isinstance(block.get("thinking"), str):
                thinking.append(block["thinking"])
        elif kind == "image":
            raise _invalid(f"'{bwhere}': images are supported in user messages only", bwhere)
        elif kind in ("document", "search_result"):
            raise _invalid(f"content block type {kind!r} is not supported (text and image only)", bwhere)
        else:
            raise _invalid(f"'{bwhere}' is not a valid {role} content block", bwhere)
    out = list(tool_messages)
    if parts or tool_calls or thinking or not tool_messages:
        text_only = all(p["type"] == "text" for p in parts)
        content = "".join(p["text"] for p in parts) if text_only else parts
        chat: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            chat["tool_calls"] = tool_calls
        if thinking:
            chat["reasoning_content"] = "".join(thinking)
        out.append(chat)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _invalid(f"'{where}' must be an object with a 'name'", where)
        if tool.get("type") not in (None, "custom"):
            raise _invalid(
                f"server tool {tool.get('type')!r} is not supported (only client tools with an input_schema)",
                where,
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"'{where}.input_schema' must be a JSON schema object", f"{where}.input_schema")
        function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, body: dict[str, Any]) -> None:
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _invalid("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _invalid("'tool_choice.name' must name a tool", "tool_choice.name")
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use"):
        body["parallel_tool_calls"] = False


def to_chat_body(
    body: Any, *, count_only: bool = False, image_names: list[str] | None = None
) -> dict[str, Any]:
    """An OpenAI chat request body for an Anthropic Messages (or count_tokens) request. The
    Anthropic names of the chat body's image parts, in order, are appended to `image_names`."""
    images = [] if image_names is None else image_names
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", "")
    allowed = _COUNT_FIELDS if count_only else _FIELDS
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in (None, neutral):
            raise _invalid(f"'{name}' is not supported (only {neutral!r})", name)
    unknown = sorted(set(body) - allowed - set(_NEUTRAL))
    if unknown:
        raise _invalid(f"unsupported field '{unknown[0]}'", unknown[0])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    chat_messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat_messages.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        chat_messages.extend(_message(i, message, images))
    chat: dict[str, Any] = {"model": body.get("model", ""), "messages": chat_messages}
    if not count_only:
        if "max_tokens" not in body:
            raise _invalid("'max_tokens' is required", "max_tokens")
        chat["max_tokens"] = body["max_tokens"]
        for name in ("temperature", "top_p", "top_k", "stream"):
            if name in body:
                chat[name] = body[name]
        if "stop_sequences" in body:
            chat["stop"] = body["stop_sequences"]
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
                raise _invalid("'metadata' may hold only 'user_id'", "metadata")
            if metadata.get("user_id") is not None:
                chat["user"] = metadata["user_id"]
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            raise _invalid("'service_tier' must be 'auto' or 'standard_only'", "service_tier")
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if "tool_choice" in body:
        _tool_choice(body["tool_choice"], chat)
    thinking = body.get("thinking")
    if thinking is not None:
        kinds = ("enabled", "disabled", "adaptive", "between_tools")
        if not isinstance(thinking, dict) or thinking.get("type") not in kinds:
            raise _invalid(f"'thinking.type' must be one of {', '.join(kinds)}", "thinking")
        # Reasoning models' templates (Qwen3, ...) read this switch; others ignore it.
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] != "disabled"}
    _output_config(body.get("output_config"), chat)
    if body.get("cache_control") is not None and not isinstance(body["cache_control"], dict):
        raise _invalid("'cache_control' must be an object", "cache_control")
    # cache_control needs no action: the workers' prefix cache keeps every full block it computed.
    return chat


def _output_config(config: Any, chat: dict[str, Any]) -> None:
    """`output_config.format` (a JSON schema) constrains the answer as `response_format` does."""
    if config is None:
        return
    if not isinstance(config, dict) or set(config) - {"format", "effort"}:
        raise _invalid("'output_config' may hold 'format' (and 'effort' null)", "output_config")
    if config.get("effort") is not None:
        raise _invalid("'output_config.effort' is not supported", "output_config.effort")
    fmt = config.get("format")
    if fmt is None:
        return
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
    ):
        raise _invalid(
            "'output_config.format' must be {'type': 'json_schema', 'schema': {...}}", "output_config.format"
        )
    chat["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"]},
    }


_PARAM_NAMES = {
    "stop": "stop_sequences",
    "user": "metadata.user_id",
    "response_format": "output_config.format",
}


def anthropic_param(param: str | None) -> str | None:
    """The Anthropic field for a chat-validation `param` (e.g. `stop` -> `stop_sequences`)."""
    if param is None:
        return None
    head = param.split(".", 1)[0].split("[", 1)[0]
    if head in _PARAM_NAMES:
        return _PARAM_NAMES[head] + param[len(head) :]
    return param.replace(".function.parameters", ".input_schema")


def _stop_reason(finish: str | None, matched_stop: str, has_tool_use: bool) -> str:
    if has_tool_use:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    if matched_stop:
        return "stop_sequence"
    return "end_turn"


_BLOCK_TYPES = {"text": "text", "reasoning": "thinking", "tool_call": "tool_use"}


@dataclass
class MessageBuilder:
    """Turns the chat pipeline's updates (one choice) into an Anthropic message or stream events;
    each output segment (gateway/output_segments.py) is one content block."""

    request_id: str
    model: str
    result: ChatResult
    output: OutputSegments = field(init=False)

    def __post_init__(self) -> None:
        self.output = OutputSegments(self.result)

    @property
    def id(self) -> str:
        return f"msg_{self.request_id}"

    def start_event(self, run: RequestRun) -> dict[str, Any]:
        message = self._message([], None, None, self._usage(run, 0))
        return {"type": "message_start", "message": message}

    def add(self, update: ChoiceUpdate) -> list[dict[str, Any]]:
        """Record an update; return the stream events it makes (block starts, deltas, stops)."""
        events: list[dict[str, Any]] = []
        for event in self.output.add(update):
            segment = self.output.segments[event.index]
            block_type = _BLOCK_TYPES[segment.kind]
            if isinstance(event, Opened):
                if event.index > 0:
                    events.append({"type": "content_block_stop", "index": event.index - 1})
                start: dict[str, Any]
                if block_type == "tool_use":
                    start = {"type": "tool_use", "id": segment.call_id, "name": segment.name, "input": {}}
                elif block_type == "thinking":
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                else:
                    start = {"type": "text", "text": ""}
                events.append({"type": "content_block_start", "index": event.index, "content_block": start})
                continue
            if block_type == "tool_use":
                delta = {"type": "input_json_delta", "partial_json": event.delta}
            else:
                delta = {"type": f"{block_type}_delta", block_type: event.delta}
            events.append({"type": "content_block_delta", "index": event.index, "delta": delta})
        return events

    def _usage(self, run: RequestRun, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": run.prompt_tokens,
            "output_tokens": output_tokens,
            "cache_read_input_tokens": run.cached_tokens,
            "cache_creation_input_tokens": 0,
        }

    def _stop(self) -> tuple[str, str | None]:
        has_tool_use = any(s.kind == "tool_call" for s in self.output.segments)
        reason = _stop_reason(self.output.finish, self.output.matched_stop, has_tool_use)
        return reason, (self.output.matched_stop if reason == "stop_sequence" else None)

    def end_events(self, run: RequestRun) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.output.segments:
            events.append({"type": "content_block_stop", "index": len(self.output.segments) - 1})
        reason, sequence = self._stop()
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": run.completion_tokens},
            }
        )
        events.append({"type": "message_stop"})
        return events

    def message(self, run: RequestRun) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for segment in self.output.segments:
            if segment.kind == "text":
                content.append({"type": "text", "text": segment.text})
            elif segment.kind == "reasoning":
                content.append({"type": "thinking", "thinking": segment.text, "signature": ""})
            else:
                try:
                    arguments = json.loads(segment.text or "{}")
                except json.JSONDecodeError:
                    arguments = None
                if not isinstance(arguments, dict):  # a parsed call whose arguments are not an object
                    arguments = {"arguments": segment.text}
                content.append(
                    {"type": "tool_use", "id": segment.call_id, "name": segment.name, "input": arguments}
                )
        reason, sequence = self._stop()
        return self._message(content, reason, sequence, self._usage(run, run.completion_tokens))

    def _message(
        self, content: list[dict[str, Any]], reason: str | None, sequence: str | None, usage: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage,
        }
