"""Chat-template rendering, byte-identical to Hugging Face `apply_chat_template`.

The Jinja environment is the one `transformers.utils.chat_template_utils` builds: an
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, the `loopcontrols`
extension, the `{% generation %}` tag, the `tojson` filter (json.dumps, no HTML escaping),
and the `raise_exception` / `strftime_now` globals; the tokenizer's named special tokens are
template variables that request kwargs may override. `continue_final_message` uses the same
marker trick. The sandbox blocks file and module access; on top of that, rendering runs under
a deadline (`RenderGuard`) and an output-size bound, and `*` / `**` on huge operands is refused,
so a hostile template yields an error instead of hanging or exhausting the service.
"""

from __future__ import annotations

import copy
import json
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.styler.render_guard import RenderGuard, RenderTimeoutError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# A template that loops over a message's content (`for part in message['content']`) takes
# OpenAI content parts; any other template expects a string.
_ITERATES_CONTENT = re.compile(r"\{%-?\s*for\s+\w+\s+in\s+[\w.\[\]'\"]*(?:\.content|\[['\"]content['\"]\])")
# Variables `render` passes itself; request kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class TemplateRenderError(ValueError):
    """The template refused the conversation or failed; the message is the template's own."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers' AssistantTracker
    records the span for assistant masks, which the styler does not need)."""

    tags = {"generation"}  # noqa: RUF012 - jinja's own class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The transformers environment, refusing `*` / `**` results past a size bound."""

    intercepted_binops = frozenset({"*", "**"})
    max_repeat_chars = 4_000_000

    def getattr(self, obj: Any, attribute: str) -> Any:
        _refuse_dunder(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _refuse_dunder(obj, argument)
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that fails only when used further (and renders as "" in
        # str.format); a template reaching for internals (`__class__`, `__globals__`, ...) is
        # refused at once instead, with the attribute named.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(count, int)
                    and len(seq) * count > self.max_repeat_chars
                ):
                    raise TemplateRenderError("chat template builds a sequence too large to render")
            return operator.mul(left, right)
        if operator_name == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(right) > 1000:
                raise TemplateRenderError("chat template computes a power too large to render")
            return operator.pow(left, right)
        return super().call_binop(context, operator_name, left, right)


def _refuse_dunder(obj: Any, name: Any) -> None:
    """No chat template needs `__x__` names; hostile ones probe them (`__globals__`, `__class__`)."""
    if isinstance(name, str) and name.startswith("__"):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {name!r} of {type(obj).__name__!r} object is unsafe"
        )


def _objects(items: Sequence[Any] | None, name: str) -> list[dict[str, Any]] | None:
    """Copies of `tools` / `documents` entries, which must be JSON objects."""
    if items is None:
        return None
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TemplateRenderError(f"{name}[{i}] must be an object, got {type(item).__name__}")
    return [dict(item) for item in items]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template in the transformers environment (cached by source text)."""
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateRenderError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc


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
    """Renders conversations with a model's (or a request's) template under a deadline."""

    def __init__(
        self, default_template: str | None, special_tokens: Mapping[str, str], guard: RenderGuard
    ) -> None:
        self.default_template = default_template
        self.special_tokens = dict(special_tokens)
        self.guard = guard
        if default_template is not None:
            compile_template(default_template)  # a broken model template fails at start

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
            raise TemplateRenderError("messages must not be empty")
        if request.continue_final_message and request.add_generation_prompt:
            raise TemplateRenderError(
                "continue_final_message and add_generation_prompt are not compatible: continue the final "
                "message, or open a new assistant turn, not both"
            )
        reserved = RESERVED_VARIABLES & set(request.template_kwargs)
        if reserved:
            raise TemplateRenderError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
        template = compile_template(template_source)
        messages = [dict(m) for m in request.messages]
        if content_format(template_source) == "string":
            messages = flatten_text_parts(messages)
        final_message = ""
        if request.continue_final_message:
            messages = copy.deepcopy(messages)
            final_message = self._tag_final_message(messages, template_source)
        variables = {**self.special_tokens, **request.template_kwargs}
        tools = _objects(request.tools, "tools")
        documents = _objects(request.documents, "documents")

        def work() -> str:
            return self._render_bounded(
                template,
                dict(
                    messages=messages,
                    tools=tools,
                    documents=documents,
                    add_generation_prompt=request.add_generation_prompt,
                    **variables,
                ),
            )

        try:
            rendered = self.guard.run(work)
        except RenderTimeoutError as exc:
            raise TemplateRenderError(str(exc)) from exc
        except TemplateRenderError:
            raise
        except RecursionError as exc:
            raise TemplateRenderError("chat template recursed too deeply") from exc
        except MemoryError as exc:
            raise TemplateRenderError("chat template ran out of memory") from exc
        except Exception as exc:
            # jinja2.TemplateError (raise_exception, undefined names) and Python errors inside
            # the template (TypeError, ...) alike: the template's own message, unchanged.
            raise TemplateRenderError(str(exc)) from exc
        if request.continue_final_message:
            rendered = self._cut_at_tag(rendered, final_message)
        return rendered

    def _render_bounded(self, template: jinja2.Template, variables: dict[str, Any]) -> str:
        parts: list[str] = []
        size = 0
        limit = self.guard.max_output_chars
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > limit:
                raise TemplateRenderError(f"chat template output exceeds {limit} characters")
            parts.append(chunk)
        return "".join(parts)

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
