"""OpenAI's Responses API as a thin translator onto the chat pipeline.

    Responses request (+ the stored conversation of `previous_response_id`)
        --to_chat_body--> OpenAI chat body --parse_chat--> the chat pipeline
    pipeline updates --ResponseBuilder--> a Response object, or its typed stream events

Validation is the chat route's (`parse_chat`); the translation reshapes fields and refuses what
has no counterpart here (built-in tools, files, background mode, ...) with a 400 naming the
field. `input_image` parts become chat `image_url` parts (gateway/media.py, docs/multimodal.md).
`store` keeps the conversation (gateway/response_store.py) so a later request can continue it
with `previous_response_id`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import APIError
from gateway.execution import ChoiceUpdate, RequestRun
from gateway.media import check_detail, check_image_url
from gateway.output_segments import Opened, OutputSegments
from gateway.responses import ChatResult

# Request fields understood; others are refused unless given at their neutral value (_NEUTRAL).
_FIELDS = {
    "model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens",
    "temperature", "top_p", "stream", "store", "previous_response_id", "metadata",
    "parallel_tool_calls", "user", "reasoning", "truncation", "include", "service_tier",
    "prompt_cache_key", "safety_identifier", "stream_options",
}  # fmt: skip
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "max_tool_calls": (None,),
    "top_logprobs": (None, 0),
    "moderation": (None,),
    "context_management": (None,),
    "image": (None,),
    "access_programs": (None,),
    "background_options": (None,),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None, "in_memory"),
}
_BUILTIN_TOOLS = {
    "web_search", "web_search_preview", "file_search", "computer_use_preview", "computer",
    "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom",
}  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def _content_text(content: Any, where: str, role: str) -> str:
    content = _content(content, where, role, [])
    assert isinstance(content, str)  # no images outside user messages
    return content


def _content(content: Any, where: str, role: str, images: list[str]) -> str | list[dict[str, Any]]:
    """A message's content for chat: its text, or (with `input_image` parts, user messages only)
    chat content parts with `image_url` parts; each image's name is appended to `images`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"'{where}' must be a string or a list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and role == "user":
            parts.append(_image_part(part, pwhere))
            images.append(pwhere)
        elif kind == "input_image":
            raise _invalid(f"'{pwhere}': images are supported in user messages only", pwhere)
        elif kind in ("input_file", "input_audio"):
            raise _invalid(f"content part type {kind!r} is not supported (text and input_image only)", pwhere)
        elif kind == "refusal" and role == "assistant":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        else:
            raise _invalid(f"'{pwhere}' is not a valid content part", pwhere)
    if any(p["type"] == "image_url" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An `input_image` part as chat's `image_url` part (the same media path from there)."""
    if part.get("file_id") is not None:
        raise _invalid(
            f"'{where}.file_id' is not supported (there is no Files API): send 'image_url' as a data: URL",
            f"{where}.file_id",
        )
    url = part.get("image_url")
    if not isinstance(url, str):
        raise _invalid(f"'{where}.image_url' must be a string (a data: or http(s) URL)", f"{where}.image_url")
    check_detail(part.get("detail"), f"{where}.detail")
    check_image_url(url, where, f"{where}.image_url")
    image_url = {"url": url, "detail": part.get("detail") or "auto"}
    return {"type": "image_url", "image_url": image_url}


def input_messages(value: Any, images: list[str] | None = None) -> list[dict[str, Any]]:
    """Chat messages for a Responses `input` (a string or a list of input items); the names of
    its images, in order, are appended to `images`."""
    images = [] if images is None else images
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _invalid("'input' must be a string or a non-empty list of input items", "input")
    out: list[dict[str, Any]] = []
    pending_reasoning = ""
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _invalid(
                    f"'{where}.role' must be user, assistant, system or developer", f"{where}.role"
                )
            message: dict[str, Any] = {
                "role": "system" if role == "developer" else role,
                "content": _content(item.get("content"), f"{where}.content", role, images),
            }
            if role == "assistant" and pending_reasoning:
                message["reasoning_content"], pending_reasoning = pending_reasoning, ""
            out.append(message)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise _invalid(f"'{where}.{name}' must be a string", f"{where}.{name}")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls of one turn
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if pending_reasoning:
                    message["reasoning_content"], pending_reasoning = pending_reasoning, ""
                out.append(message)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _invalid(f"'{where}.call_id' must be a string", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output", "tool")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            pending_reasoning += "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise _invalid(f"input item type {kind!r} is not supported", where)
    return out


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages a stored response's output items add to its conversation."""
    items: list[dict[str, Any]] = []
    for item in output:
        if item.get("type") == "message":
            items.append({"type": "message", "role": "assistant", "content": item.get("content", [])})
        elif item.get("type") in ("function_call", "reasoning"):
            items.append(item)
    return input_messages(items) if items else []


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in _BUILTIN_TOOLS or (isinstance(kind, str) and kind.startswith("web_search")):
            raise _invalid(f"built-in tool {kind!r} is not supported (only function tools)", where)
        if kind != "function" or not isinstance(tool.get("name"), str):
            raise _invalid(f"'{where}' must be a function tool with a 'name'", where)
        function: dict[str, Any] = {
            "name": tool["name"],
            "parameters": tool.get("parameters") or {"type": "object"},
        }
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):  # strict tool calls (gateway/strict_tools.py)
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _invalid(
        "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}", "tool_choice"
    )


def _text_format(text: Any, chat: dict[str, Any]) -> None:
    if text is None:
        return
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise _invalid("'text' may hold 'format' and 'verbosity'", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise _invalid("'text.verbosity' is not supported (only 'medium')", "text.verbosity")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
        return
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema: dict[str, Any] = {"name": fmt.get("name") or "output", "schema": fmt["schema"]}
        if "strict" in fmt:
            schema["strict"] = fmt["strict"]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        return
    raise _invalid("'text.format' must be text, json_object or json_schema with a 'schema'", "text.format")


def to_chat_body(
    body: dict[str, Any], history: list[dict[str, Any]], image_names: list[str] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the chat body, the conversation without instructions) for a Responses request. The
    Responses names of the chat body's image parts, in order, are appended to `image_names` (an
    image of the stored conversation is named by `previous_response_id`)."""
    images = [] if image_names is None else image_names
    for message in history:
        content = message.get("content")
        if isinstance(content, list):
            images += ["previous_response_id" for p in content if p.get("type") == "image_url"]
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise _invalid(f"'{name}' is not supported", name)
    unknown = sorted(set(body) - _FIELDS - set(_NEUTRAL))
    if unknown:
        raise _invalid(f"unsupported field '{unknown[0]}'", unknown[0])
    if "input" not in body:
        raise _invalid("'input' is required", "input")
    conversation = [*history, *input_messages(body["input"], images)]
    messages = list(conversation)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("'instructions' must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": body.get("model", ""), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "user", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("safety_identifier") is not None and "user" not in chat:
        chat["user"] = body["safety_identifier"]
    if body.get("stream_options") is not None:
        if not body.get("stream"):
            raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(body["stream_options"], dict) or set(body["stream_options"]) - {
            "include_obfuscation"
        }:
            raise _invalid("'stream_options' may hold only 'include_obfuscation'", "stream_options")
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    _text_format(body.get("text"), chat)
    if body.get("truncation") not in (None, "disabled"):
        raise _invalid("'truncation' is not supported (only 'disabled')", "truncation")
    if body.get("include") not in (None, []):
        raise _invalid("'include' is not supported", "include")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise _invalid("'service_tier' must be 'auto' or 'default'", "service_tier")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _invalid("'metadata' must be an object of at most 16 string values", "metadata")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary", "generate_summary"}:
            raise _invalid("'reasoning' may hold 'effort' and 'summary'", "reasoning")
        effort = reasoning.get("effort")
        if effort is not None:
            # Reasoning models' templates (Qwen3, ...) read this switch; others ignore it.
            chat["chat_template_kwargs"] = {"enable_thinking": effort not in ("none", "minimal")}
    return chat, conversation


_PARAM_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    head = param.split(".", 1)[0].split("[", 1)[0]
    if head in _PARAM_NAMES:
        return _PARAM_NAMES[head] + param[len(head) :]
    return param.replace(".function.parameters", ".parameters")


@dataclass
class _Item:
    """The Responses identity of one output segment (gateway/output_segments.py)."""

    id: str
    call_id: str = ""
    done: bool = False


_ITEM_TYPES = {"text": "message", "reasoning": "reasoning", "tool_call": "function_call"}
_ID_PREFIXES = {"text": "msg", "reasoning": "rs", "tool_call": "fc"}


@dataclass
class ResponseBuilder:
    """Turns the chat pipeline's updates (one choice) into a Response or its stream events."""

    body: dict[str, Any]  # the request, for the echoed fields
    chat_body: dict[str, Any]
    model: str
    result: ChatResult
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: list[_Item] = field(default_factory=list)  # one per segment of `output`
    sequence: int = 0
    output: OutputSegments = field(init=False)  # the choice's segments, one item each

    def __post_init__(self) -> None:
        self.output = OutputSegments(self.result)

    @property
    def finish(self) -> str | None:
        return self.output.finish

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    # ---- the stream ------------------------------------------------------------------------------
    def start_events(self) -> list[dict[str, Any]]:
        snapshot = self.response(None, status="in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def add(self, update: ChoiceUpdate) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for event in self.output.add(update):
            if isinstance(event, Opened):
                events += self._open(event.index)
            else:
                events += self._delta(event.index, event.delta)
        return events

    def _close_last(self) -> list[dict[str, Any]]:
        if not self.items or self.items[-1].done:
            return []
        item = self.items[-1]
        item.done = True
        index = len(self.items) - 1
        segment = self.output.segments[index]
        events = []
        if segment.kind == "text":
            part = {"type": "output_text", "text": segment.text, "annotations": [], "logprobs": []}
            events.append(
                self._event(
                    "response.output_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=segment.text,
                    logprobs=[],
                )
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        elif segment.kind == "reasoning":
            events.append(
                self._event(
                    "response.reasoning_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=segment.text,
                )
            )
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=segment.name,
                    arguments=segment.text,
                )
            )
        events.append(
            self._event(
                "response.output_item.done", output_index=index, item=self._item_json(index, "completed")
            )
        )
        return events

    def _open(self, index: int) -> list[dict[str, Any]]:
        events = self._close_last()
        segment = self.output.segments[index]
        call_id = (segment.call_id or new_id("call")) if segment.kind == "tool_call" else ""
        self.items.append(_Item(new_id(_ID_PREFIXES[segment.kind]), call_id))
        events.append(
            self._event(
                "response.output_item.added", output_index=index, item=self._item_json(index, "in_progress")
            )
        )
        if segment.kind == "text":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=self.items[index].id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def _delta(self, index: int, delta: str) -> list[dict[str, Any]]:
        kind, item_id = self.output.segments[index].kind, self.items[index].id
        if kind == "tool_call":
            name = "response.function_call_arguments.delta"
            return [self._event(name, item_id=item_id, output_index=index, delta=delta)]
        name = "response.output_text.delta" if kind == "text" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "text" else {}
        return [self._event(name, item_id=item_id, output_index=index, content_index=0, delta=delta, **extra)]

    def end_events(self, run: RequestRun) -> list[dict[str, Any]]:
        events = self._close_last()
        response = self.response(run)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=response))
        return events

    # ---- the Response object ---------------------------------------------------------------------
    def _item_json(self, index: int, status: str) -> dict[str, Any]:
        segment, item = self.output.segments[index], self.items[index]
        kind = _ITEM_TYPES[segment.kind]
        if kind == "message":
            content = (
                [{"type": "output_text", "text": segment.text, "annotations": [], "logprobs": []}]
                if status != "in_progress"
                else []
            )
            return {
                "type": "message",
                "id": item.id,
                "status": status,
                "role": "assistant",
                "content": content,
            }
        if kind == "reasoning":
            content = [{"type": "reasoning_text", "text": segment.text}] if status != "in_progress" else []
            return {"type": "reasoning", "id": item.id, "summary": [], "content": content, "status": status}
        arguments = segment.text if status != "in_progress" else ""
        return {
            "type": "function_call",
            "id": item.id,
            "call_id": item.call_id,
            "name": segment.name,
            "arguments": arguments,
            "status": status,
        }

    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def response(self, run: RequestRun | None, status: str | None = None) -> dict[str, Any]:
        status = status or self.status()
        body = self.body
        item_status = "incomplete" if status == "incomplete" else "completed"
        output = [self._item_json(i, item_status) for i in range(len(self.items))] if run is not None else []
        usage = None
        if run is not None:
            usage = {
                "input_tokens": run.prompt_tokens,
                "input_tokens_details": {"cached_tokens": run.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": run.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": run.prompt_tokens + run.completion_tokens,
            }
        tools = body.get("tools") or []
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "service_tier": body.get("service_tier") or "default",
            "store": body.get("store", True),
            "temperature": self.chat_body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools,
            "top_logprobs": 0,
            "top_p": self.chat_body.get("top_p", 1.0),
            "truncation": body.get("truncation") or "disabled",
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
