"""The Jinja environment chat templates run in, with a bound on every operation that sizes
its result from a number.

The environment is the one `transformers.utils.chat_template_utils` builds: an
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, the `loopcontrols`
extension, the `{% generation %}` tag, the `tojson` filter (json.dumps, no HTML escaping), and
the `raise_exception` / `strftime_now` globals. Jinja's sandbox blocks file and module access
and bounds `range`; it does not bound what a number can make a string or list grow to: `'x' *
n`, `'%2000000000d' % 1`, `'{:>2000000000}'.format(1)`, `s.center(n)` / `ljust` / `rjust` /
`zfill` / `expandtabs`, and the filters `center`, `indent`, `format`, `batch`, `slice` each
allocate gigabytes from a few bytes of template. Each of these is checked here before it runs,
and refused with `TemplateLimitError` (no chat template pads a field to more than `MAX_WIDTH`
characters). What slips past these checks (a template that grows a string in a loop) still meets
the render process's address-space limit and deadline (render_pool.py).
"""

from __future__ import annotations

import json
import operator
import re
import string
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_WIDTH = 100_000  # widest field / padding / repeat count a template may ask for
MAX_REPEAT_CHARS = 4_000_000  # largest `seq * n` result
MAX_POWER_EXPONENT = 1000

# A `%` conversion spec: optional mapping key, flags, width, precision.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


class TemplateLimitError(ValueError):
    """The template asked for more than the sandbox allows (a huge width, repeat or power)."""


class TemplateSyntaxError(ValueError):
    """The template does not compile; the message names the line."""


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


def _check_width(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WIDTH:
        raise TemplateLimitError(f"{what} {value} exceeds the limit of {MAX_WIDTH}")


def _check_percent_format(fmt: str, args: Any) -> None:
    """`fmt % args`: no width or precision past MAX_WIDTH, also when given by `*`."""
    star = False
    for match in _PERCENT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*":
                star = True
            elif group:
                _check_width(int(group), "format width")
    if star:
        for arg in args if isinstance(args, tuple) else (args,):
            _check_width(arg, "format width")


def _check_str_format(fmt: str) -> None:
    """`fmt.format(...)`: no width or precision past MAX_WIDTH; no specs built from arguments."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error for a malformed string
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            raise TemplateLimitError("format specs built from arguments ('{:{}}') are not supported")
        for digits in _DIGITS.findall(spec):
            _check_width(int(digits), "format width")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The transformers environment, refusing results sized past the bounds above."""

    intercepted_binops = frozenset({"*", "**", "%"})

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

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_str_format(value.__self__)
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(__obj, "__name__", None) in _PADDING_METHODS and isinstance(
            getattr(__obj, "__self__", None), str
        ):
            for arg in (*args, *kwargs.values()):
                _check_width(arg, f"{__obj.__name__} width")
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(count, int)
                    and len(seq) * count > MAX_REPEAT_CHARS
                ):
                    raise TemplateLimitError("chat template builds a sequence too large to render")
            return operator.mul(left, right)
        if operator_name == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(right) > MAX_POWER_EXPONENT:
                raise TemplateLimitError("chat template computes a power too large to render")
            return operator.pow(left, right)
        if operator_name == "%":
            if isinstance(left, str):
                _check_percent_format(left, right)
            return operator.mod(left, right)
        return super().call_binop(context, operator_name, left, right)


def _refuse_dunder(obj: Any, name: Any) -> None:
    """No chat template needs `__x__` names; hostile ones probe them (`__globals__`, `__class__`)."""
    if isinstance(name, str) and name.startswith("__"):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {name!r} of {type(obj).__name__!r} object is unsafe"
        )


def _center(value: str, width: int = 80) -> str:
    _check_width(width, "center width")
    return jinja2.filters.do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    if isinstance(width, str) and len(width) > MAX_WIDTH:
        raise TemplateLimitError(f"indent string exceeds the limit of {MAX_WIDTH} characters")
    _check_width(width, "indent width")
    return jinja2.filters.do_indent(s, width, first, blank)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value), tuple(kwargs.values()) or args)
    return jinja2.filters.do_format(value, *args, **kwargs)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    _check_width(linecount, "batch size")
    return jinja2.filters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    _check_width(slices, "slice count")
    return jinja2.filters.do_slice(value, slices, fill_with)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    if isinstance(indent, str) and len(indent) > MAX_WIDTH:
        raise TemplateLimitError(f"tojson indent exceeds the limit of {MAX_WIDTH} characters")
    _check_width(indent, "tojson indent")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template in the bounded transformers environment (cached by source text)."""
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters.update(
        tojson=_tojson, center=_center, indent=_indent, format=_format, batch=_batch, slice=_slice
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateSyntaxError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc
