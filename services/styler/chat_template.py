"""Chat-template rendering, byte-identical to Hugging Face `apply_chat_template` on the messages
vLLM would pass it.

Messages are first normalised as vLLM does for OpenAI clients: a `content` of None (the SDK's
assistant message with `tool_calls`) or a missing one becomes "", and tool-call `arguments`
given as JSON text become the object templates expect (`arguments | tojson`). The template runs
in the bounded sandbox (template_sandbox.py) inside a render process with a memory ceiling and a
deadline (render_pool.py). The tokenizer's named special tokens are template variables that
request kwargs may override. `continue_final_message` uses transformers' marker trick. A failure
is a `TemplateRenderError` naming the request field to blame (`chat_template`, or the message
`messages[i]` the template was at) and the template line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.styler.messages import parse_arguments
from services.styler.render_pool import RenderFailure, RenderPool, RenderTimeoutError
from services.styler.template_sandbox import compile_template

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# A template that loops over a message's content (`for part in message['content']`) takes
# OpenAI content parts; any other template expects a string.
_ITERATES_CONTENT = re.compile(r"\{%-?\s*for\s+\w+\s+in\s+[\w.\[\]'\"]*(?:\.content|\[['\"]content['\"]\])")
# Variables `render` passes itself; request kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class TemplateRenderError(ValueError):
    """The template refused the conversation or failed; `str()` is the template's own message,
    `field` the request field to blame and `line` the template line, when known."""

    def __init__(self, message: str, field: str = "chat_template", line: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.line = line

    def describe(self) -> str:
        """The message for the client: field, message and template line."""
        where = f" (chat template line {self.line})" if self.line is not None else ""
        return f"{self.field}: {self}{where}"


def _objects(items: Sequence[Any] | None, name: str) -> list[dict[str, Any]] | None:
    """Copies of `tools` / `documents` entries, which must be JSON objects."""
    if items is None:
        return None
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TemplateRenderError(f"{name}[{i}] must be an object, got {type(item).__name__}", name)
    return [dict(item) for item in items]


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to templates: `content` None or missing -> "", and tool-call
    `arguments` given as JSON object text -> the object (templates write `arguments | tojson`)."""
    out = []
    for message in messages:
        m = dict(message)
        if m.get("content") is None:
            m["content"] = ""
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m["tool_calls"] = [_normalize_tool_call(c) for c in calls]
        out.append(m)
    return out


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    function = call.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
        return {**call, "function": {**function, "arguments": parse_arguments(function["arguments"])}}
    return call


def content_format(template: str) -> str:
    """ "openai" when the template iterates over content parts, else "string" (as vLLM detects it)."""
    return "openai" if _ITERATES_CONTENT.search(template) else "string"


def flatten_text_parts(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with list-of-text-parts content joined into one string ("\n" between parts, as vLLM)."""
    out = []
    for message in messages:
        m = dict(message)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(str(p.get("text", "")) for p in m["content"] if p.get("type") == "text")
        out.append(m)
    return out


@dataclass(frozen=True)
class RenderInput:
    """One conversation to render (the arguments of `apply_chat_template`)."""

    messages: Sequence[Mapping[str, Any]]  # OpenAI-style message dicts, as templates expect them
    tools: Sequence[Mapping[str, Any]] | None = None  # JSON schemas of the tools, or None
    documents: Sequence[Mapping[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # replaces the model's template
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}


class ChatTemplateRenderer:
    """Renders conversations with a model's (or a request's) template in the render pool."""

    def __init__(
        self, default_template: str | None, special_tokens: Mapping[str, str], pool: RenderPool
    ) -> None:
        self.default_template = default_template
        self.special_tokens = dict(special_tokens)
        self.pool = pool
        if default_template is not None:
            try:
                compile_template(default_template)  # a broken model template fails at start
            except ValueError as exc:
                raise TemplateRenderError(str(exc)) from exc

    def render(self, request: RenderInput) -> str:
        """The prompt text; TemplateRenderError (a ValueError) when the template refuses."""
        template_source = (
            request.chat_template if request.chat_template is not None else self.default_template
        )
        if template_source is None:
            raise TemplateRenderError(
                "this model has no chat template: pass `chat_template` with the request, start the styler "
                "with --chat-template FILE, or use the completions API"
            )
        if not request.messages:
            raise TemplateRenderError("messages must not be empty", "messages")
        if request.continue_final_message and request.add_generation_prompt:
            raise TemplateRenderError(
                "continue_final_message and add_generation_prompt are not compatible: continue the final "
                "message, or open a new assistant turn, not both",
                "continue_final_message",
            )
        reserved = RESERVED_VARIABLES & set(request.template_kwargs)
        if reserved:
            raise TemplateRenderError(
                f"chat_template_kwargs may not set {', '.join(sorted(reserved))}", "chat_template_kwargs"
            )
        messages = normalize_messages(request.messages)
        if content_format(template_source) == "string":
            messages = flatten_text_parts(messages)
        final_message = ""
        if request.continue_final_message:
            messages = copy.deepcopy(messages)
            final_message = self._tag_final_message(messages, template_source)
        variables = {
            **self.special_tokens,
            **request.template_kwargs,
            "messages": messages,
            "tools": _objects(request.tools, "tools"),
            "documents": _objects(request.documents, "documents"),
            "add_generation_prompt": request.add_generation_prompt,
        }
        try:
            rendered = self.pool.render(template_source, variables)
        except RenderTimeoutError as exc:
            raise TemplateRenderError(str(exc)) from None
        except RenderFailure as exc:
            raise TemplateRenderError(exc.message, exc.field, exc.line) from None
        if request.continue_final_message:
            rendered = self._cut_at_tag(rendered, final_message)
        return rendered

    @staticmethod
    def _tag_final_message(messages: list[dict[str, Any]], template_source: str) -> str:
        # transformers' render_jinja_template, for continue_final_message=True ("content").
        key = "content"
        final = messages[-1].get(key)
        if final is None:
            raise TemplateRenderError(
                f'continue_final_message is set but the final message has no "{key}" to continue!'
            )
        if key not in template_source:
            raise TemplateRenderError(
                f'continue_final_message is set to "{key}" but this is not an accepted field in the chat_template'
            )
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if "text" in block:
                    text = block["text"]
                    block["text"] = text + _CONTINUE_TAG
                    return str(text)
            raise TemplateRenderError(
                "continue_final_message is set but we could not find any text to continue in the final message!"
            )
        messages[-1][key] = final + _CONTINUE_TAG
        return str(final)

    @staticmethod
    def _cut_at_tag(rendered: str, final_message: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_message.strip() not in rendered or tag not in rendered:
            raise TemplateRenderError(
                "continue_final_message is set but the final message does not appear in the chat after "
                "applying the chat template! This can happen if the chat template deletes portions of "
                "the final message. Please verify the chat template and final message in your chat to "
                "ensure they are compatible."
                f"Final message to continue: {final_message.strip()}\nRendered chat:\n{rendered}"
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:loc]
        return rendered[:loc].rstrip()
