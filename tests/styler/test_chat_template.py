"""Render equals transformers' apply_chat_template for every shared template and tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from services.styler.chat_template import RenderInput, TemplateRenderError, content_format, flatten_text_parts
from services.styler.messages import message_dict, tool_call_dict
from services.styler.styler import Styler, StylerOptions

from .helpers import (
    load_styler,
    needs_shared,
    reference_tokenizer,
    template_files,
    tokenizer_dirs,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "now",
            "description": "The time.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
CALL = tool_call_dict("call_0a1b2c3d4", "get_weather", '{"city": "Zürich", "unit": "c"}')
CALL2 = tool_call_dict("call_9z8y7x6w5", "now", "{}")

# name -> (messages, tools, extra template kwargs)
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]] = {
    "single": ([message_dict("user", "Hello! 你好 👋")], None, {}),
    "system": ([message_dict("system", "You are terse."), message_dict("user", "Hi there")], None, {}),
    "multi_turn": (
        [
            message_dict("system", "Be kind."),
            message_dict("user", "What is 2+2?"),
            message_dict("assistant", "4."),
            message_dict("user", [{"type": "text", "text": "And "}, {"type": "text", "text": "3+3?"}]),
        ],
        None,
        {},
    ),
    "reasoning_history": (
        [
            message_dict("user", "Think about 2+2."),
            message_dict("assistant", "4", reasoning_content="2 and 2 make 4."),
            message_dict("user", "Thanks"),
        ],
        None,
        {"enable_thinking": False},
    ),
    "tools_list": ([message_dict("user", "Weather in Zürich?")], TOOLS, {}),
    "tool_calls": (
        [
            message_dict("user", "Weather in Zürich, and the time?"),
            message_dict("assistant", None, tool_calls=[CALL, CALL2]),
            message_dict("tool", '{"temp": 21}', tool_call_id=CALL["id"], name="get_weather"),
            message_dict("tool", "12:00", tool_call_id=CALL2["id"], name="now"),
        ],
        TOOLS,
        {},
    ),
    "tool_calls_no_tools": (
        [
            message_dict("system", "Use tools."),
            message_dict("user", "Weather?"),
            message_dict("assistant", "Let me check.", tool_calls=[CALL]),
            message_dict("tool", "sunny", tool_call_id=CALL["id"]),
        ],
        None,
        {},
    ),
    "continue": (
        [message_dict("user", "Write a poem."), message_dict("assistant", "Roses are red,")],
        None,
        {},
    ),
}
# (conversation, add_generation_prompt, continue_final_message)
CASES = [
    *((name, agp, False) for name in CONVERSATIONS if name != "continue" for agp in (True, False)),
    ("continue", False, True),
]


def _templates() -> list[tuple[str, str | None]]:
    """(id, template text) — every shared template, plus each tokenizer's own (None)."""
    return [(p.stem, p.read_text(encoding="utf-8")) for p in template_files()] + [("own", None)]


def _reference(
    tok_dir: Path, template: str | None, case: tuple[str, bool, bool]
) -> tuple[str, list[int]] | str:
    """transformers' (prompt, ids), or the error message it raised."""
    name, agp, cont = case
    messages, tools, kwargs = CONVERSATIONS[name]
    ref = reference_tokenizer(str(tok_dir))
    source = template if template is not None else ref.chat_template
    # vLLM hands templates "" for a missing / None content (the SDK's assistant tool-call turn).
    messages = [{**m, "content": "" if m.get("content") is None else m["content"]} for m in messages]
    if content_format(source) == "string":  # text parts are joined for templates that expect a string
        messages = flatten_text_parts(messages)
    args: dict[str, Any] = dict(
        tools=copy.deepcopy(tools),
        chat_template=template,
        add_generation_prompt=agp,
        continue_final_message=cont,
        **kwargs,
    )
    try:
        text = ref.apply_chat_template(copy.deepcopy(messages), tokenize=False, **args)
        ids = ref.apply_chat_template(copy.deepcopy(messages), tokenize=True, return_dict=False, **args)
    except Exception as exc:
        return str(exc)
    return text, list(ids)


def _ours(tok_dir: Path, template: str | None, case: tuple[str, bool, bool]) -> tuple[str, list[int]] | str:
    name, agp, cont = case
    messages, tools, kwargs = CONVERSATIONS[name]
    request = RenderInput(
        messages=copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        add_generation_prompt=agp,
        continue_final_message=cont,
        chat_template=template,
        template_kwargs=kwargs,
    )
    try:
        rendered = load_styler(str(tok_dir)).render(request)
    except TemplateRenderError as exc:
        return str(exc)
    return rendered.prompt, rendered.token_ids


@needs_shared
@pytest.mark.parametrize("tok_dir", tokenizer_dirs(), ids=lambda p: p.name)
def test_render_matches_transformers(tok_dir: Path) -> None:
    """Every template x conversation x generation-prompt setting, for one tokenizer."""
    mismatches: list[str] = []
    num_rendered = num_refused = 0
    for template_id, template in _templates():
        for case in CASES:
            ref, ours = _reference(tok_dir, template, case), _ours(tok_dir, template, case)
            if isinstance(ref, str):
                num_refused += 1
            else:
                num_rendered += 1
            if ref != ours:
                mismatches.append(f"{template_id} {case}:\n  ref:  {ref!r}\n  ours: {ours!r}")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:5])
    assert num_rendered > num_refused  # the suite exercises rendering, not just errors


@needs_shared
def test_template_error_message_is_the_templates_own() -> None:
    tok_dir = tokenizer_dirs()[0]
    styler = load_styler(str(tok_dir))
    template = "{{ raise_exception('Only user and assistant roles are supported! got ' + messages[0].role) }}"
    with pytest.raises(TemplateRenderError) as ours:
        styler.render(RenderInput(messages=[message_dict("tool", "x")], chat_template=template))
    with pytest.raises(Exception) as ref:
        reference_tokenizer(str(tok_dir)).apply_chat_template(
            [{"role": "tool", "content": "x"}], chat_template=template, tokenize=False
        )
    assert str(ours.value) == str(ref.value) == "Only user and assistant roles are supported! got tool"


@needs_shared
def test_tojson_strftime_and_loop_controls_match() -> None:
    tok_dir = tokenizer_dirs()[0]
    template = (
        "{{ messages | tojson }}|{{ tools | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% continue %}x{% endfor %}"
        "{% generation %}<gen>{% endgeneration %}{{ eos_token }}{{ bos_token }}"
    )
    messages = [message_dict("user", "<b>&'\"é</b>"), message_dict("assistant", "ok")]
    ours = load_styler(str(tok_dir)).render(
        RenderInput(messages=messages, tools=TOOLS, chat_template=template, add_generation_prompt=False)
    )
    ref = reference_tokenizer(str(tok_dir)).apply_chat_template(
        copy.deepcopy(messages), tools=TOOLS, chat_template=template, tokenize=False
    )
    assert ours.prompt == ref
    assert json.dumps(messages, ensure_ascii=False) in ours.prompt  # no HTML escaping


@needs_shared
def test_hostile_templates_fail_cleanly() -> None:
    styler = load_styler(str(tokenizer_dirs()[0]), render_timeout_s=0.5, max_prompt_chars=100_000)
    user = [message_dict("user", "x")]
    cases = {
        "forever": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "huge": "{{ 'x' * 10000000000 }}",
        "output": "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
        "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "files": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "mutation": "{% set x = [] %}{{ x.append(1) }}",
    }
    for name, template in cases.items():
        with pytest.raises(TemplateRenderError) as exc:
            styler.render(RenderInput(messages=user, chat_template=template))
        assert str(exc.value), name
    # still healthy afterwards
    assert styler.render(RenderInput(messages=user, chat_template="{{ messages[0].content }}")).prompt == "x"


@needs_shared
def test_model_without_template_gives_clear_error(tmp_path: Path) -> None:
    src = tokenizer_dirs()[0]
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    styler = load_styler(str(tmp_path))
    assert not styler.info().has_chat_template
    with pytest.raises(TemplateRenderError, match="no chat template"):
        styler.render(RenderInput(messages=[message_dict("user", "hi")]))


@needs_shared
def test_content_parts_reach_templates_that_iterate_them() -> None:
    tok_dir = tokenizer_dirs()[0]
    template = "{% for m in messages %}{% for p in m['content'] %}[{{ p.text }}]{% endfor %}{% endfor %}"
    assert content_format(template) == "openai"
    messages = [message_dict("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    ours = load_styler(str(tok_dir)).render(RenderInput(messages=messages, chat_template=template))
    ref = reference_tokenizer(str(tok_dir)).apply_chat_template(
        copy.deepcopy(messages), chat_template=template, tokenize=False
    )
    assert ours.prompt == ref == "[a][b]"


def _sdk_tool_loop(call_id: str) -> list[dict[str, Any]]:
    """The messages of the OpenAI SDK's canonical tool loop as the client sends them: the reply's
    message as is (`content: None`, `refusal: None`, arguments as JSON text) and a `tool` answer."""
    return [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
    ]


@needs_shared
@pytest.mark.parametrize("tok_dir", tokenizer_dirs(), ids=lambda p: p.name)
def test_sdk_tool_loop_renders_with_every_tool_template(tok_dir: Path) -> None:
    """The tokenizer's own template and every shared template that takes tools render the loop;
    the result is transformers' rendering of the normalised messages (content "", arguments a dict)."""
    styler = load_styler(str(tok_dir))
    templates = [("own", styler.chat_template or "")] + [
        (p.stem, p.read_text(encoding="utf-8")) for p in template_files()
    ]
    checked = 0
    for name, source in templates:
        if "tool_calls" not in source:
            continue
        # Mistral's templates take only its own 9-character ids (what its tool parser makes).
        messages = _sdk_tool_loop("a1B2c3D4e" if "length 9" in source else "call_0a1b2c3d4e5f")
        ours = styler.render(RenderInput(messages=messages, tools=TOOLS, chat_template=source))
        normalised = copy.deepcopy(messages)
        normalised[1]["content"] = ""
        normalised[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Zürich"}
        ref = reference_tokenizer(str(tok_dir)).apply_chat_template(
            normalised, tools=TOOLS, chat_template=source, tokenize=False, add_generation_prompt=True
        )
        assert ours.prompt == ref, name
        assert "Zürich" in ours.prompt and "21" in ours.prompt, name
        checked += 1
    assert checked >= 2


@needs_shared
def test_template_error_names_the_message_and_line() -> None:
    styler = load_styler(str(tokenizer_dirs()[0]))
    template = (
        "{% for m in messages %}\n{% if m.role == 'tool' %}{{ m.content.nope() }}{% endif %}{% endfor %}"
    )
    messages = [message_dict("user", "hi"), message_dict("tool", "x", tool_call_id="1")]
    with pytest.raises(TemplateRenderError) as exc:
        styler.render(RenderInput(messages=messages, chat_template=template))
    assert (exc.value.field, exc.value.line) == ("messages[1]", 2)
    assert exc.value.describe() == "messages[1]: 'str object' has no attribute 'nope' (chat template line 2)"


@needs_shared
@pytest.mark.parametrize(
    "template",
    [
        '{{ "%2000000000d" % 1 }}',
        '{{ "%.2000000000f" % 1.5 }}',
        '{{ "%(a)2000000000s" % {"a": 1} }}',
        "{{ '{:>2000000000}'.format(1) }}",
        "{{ '{0:{1}}'.format(1, 2000000000) }}",
        "{{ 'x'.center(2000000000) }}",
        "{{ 'x'.ljust(2000000000) }}",
        "{{ 'x'['rjust'](2000000000) }}",
        "{{ '\\t'.expandtabs(2000000000) }}",
        "{{ 'x' | center(2000000000) }}",
        "{{ 'x\\ny' | indent(2000000000) }}",
        "{{ '%2000000000s' | format('x') }}",
        "{{ [1] | batch(2000000000, 0) | list }}",
        "{{ [1] | slice(2000000000, 0) | list }}",
        "{{ messages | tojson(indent=2000000000) }}",
    ],
)
def test_sizes_from_numbers_are_bounded(template: str) -> None:
    styler = load_styler(str(tokenizer_dirs()[0]))
    with pytest.raises(TemplateRenderError) as exc:
        styler.render(RenderInput(messages=[message_dict("user", "x")], chat_template=template))
    assert exc.value.field == "chat_template", exc.value.describe()
    assert "limit" in str(exc.value) or "not supported" in str(exc.value)


@needs_shared
def test_normal_widths_render_as_jinja_does() -> None:
    styler = load_styler(str(tokenizer_dirs()[0]))
    template = (
        "{{ '%5d|%-4s|%.2f' % (42, 'ab', 3.14159) }}|{{ '{:>6}|{:08.3f}'.format('r', 2.5) }}|"
        "{{ 'c'.center(5) }}|{{ 'x\\ny' | indent(2) }}|{{ '%03d' | format(7) }}|{{ '7'.zfill(3) }}"
    )
    ours = styler.render(RenderInput(messages=[message_dict("user", "x")], chat_template=template)).prompt
    ref = reference_tokenizer(str(tokenizer_dirs()[0])).apply_chat_template(
        [{"role": "user", "content": "x"}], chat_template=template, tokenize=False
    )
    assert ours == ref == "   42|ab  |3.14|     r|0002.500|  c  |x\n  y|007|007"


@needs_shared
def test_a_render_past_the_deadline_is_killed_and_the_pool_recovers() -> None:
    styler = Styler.load(
        StylerOptions(model=str(tokenizer_dirs()[0]), render_timeout_s=0.5, render_processes=1)
    )
    try:
        loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        with pytest.raises(TemplateRenderError, match=r"longer than 0\.5s") as exc:
            styler.render(RenderInput(messages=[message_dict("user", "x")], chat_template=loop))
        assert exc.value.field == "chat_template"
        # The one process was replaced: the next render works.
        ok = styler.render(
            RenderInput(messages=[message_dict("user", "x")], chat_template="{{ messages[0].content }}")
        )
        assert ok.prompt == "x"
    finally:
        styler.close()


@needs_shared
def test_memory_is_capped_in_the_render_process() -> None:
    styler = Styler.load(
        StylerOptions(
            model=str(tokenizer_dirs()[0]), render_timeout_s=30, render_memory_mb=512, render_processes=1
        )
    )
    grow = (
        "{% set ns = namespace(x='xxxxxxxx') %}{% for i in range(99999) %}{% set ns.x = ns.x ~ ns.x %}"
        "{% endfor %}{{ ns.x | length }}"
    )
    try:
        with pytest.raises(TemplateRenderError, match="out of memory"):
            styler.render(RenderInput(messages=[message_dict("user", "x")], chat_template=grow))
        ok = styler.render(
            RenderInput(messages=[message_dict("user", "x")], chat_template="{{ messages[0].content }}")
        )
        assert ok.prompt == "x"
    finally:
        styler.close()
