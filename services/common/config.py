"""Frozen-dataclass configuration turned into command-line options.

Each component declares one frozen dataclass. Every field has a default and a docstring (a
string literal right below it); `parse_config` turns the fields into argparse options whose help
text is that docstring. Values come from, in rising priority: the field default, the environment
variable `TANDEM_<FIELD>` (the only place environment variables are read for configuration), and
the command line. A bad value, from either source, is a one-line error naming the option.

    @dataclass(frozen=True)
    class StylerConfig:
        model: str = "./models/default"
        \"\"\"Model (or tokenizer-only) directory.\"\"\"

`__post_init__` may raise `ValueError` to reject a combination; the message is shown as is.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn, TypeVar, get_args, get_origin

T = TypeVar("T")

ENV_PREFIX = "TANDEM_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> docstring written below the field in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        statements = body.body
        for stmt, following in itertools.pairwise(statements):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def convert(value: str, tp: Any, name: str) -> Any:
    """Convert text to the field type `tp`; raise ConfigError naming `name` when it does not fit."""
    inner, optional = _unwrap_optional(tp)
    if optional and value.strip().lower() in ("", "none", "null"):
        return None
    origin = get_origin(inner)
    if origin in (list, tuple, Sequence):
        (item_tp, *_) = get_args(inner) or (str,)
        items = [v for v in (p.strip() for p in value.split(",")) if v]
        converted = [convert(v, item_tp, name) for v in items]
        return tuple(converted) if origin is tuple else converted
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(
                f"{name}: invalid choice {value!r} (choose from {', '.join(map(str, choices))})"
            )
        return value
    if inner is bool:
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: invalid boolean value {value!r} (use true or false)")
    if inner in (int, float):
        try:
            return inner(value)
        except ValueError:
            raise ConfigError(f"{name}: invalid {inner.__name__} value {value!r}") from None
    if inner is str:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the option, then exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass `cls`."""
    parser = _OneLineParser(
        prog=prog,
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_options(parser, cls)
    return parser


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        help_text = docs.get(f.name, "") + f" [env: {env_name(f.name)}]"
        default = _default_of(f)
        opt = option_name(f.name)
        if inner is bool:
            parser.add_argument(
                opt, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif get_origin(inner) in (list, tuple, Sequence):
            (item_tp, *_) = get_args(inner) or (str,)
            parser.add_argument(
                opt,
                dest=f.name,
                action="append",
                default=None,
                metavar=f.name.upper().removesuffix("S"),
                type=_argparse_type(item_tp, opt),
                help=help_text
                + " (repeat the option, or comma-separate values in the env var)"
                + f" (default: {default!r})",
            )
        else:
            choices = get_args(inner) if get_origin(inner) is Literal else None
            parser.add_argument(
                opt,
                dest=f.name,
                default=default,
                choices=choices,
                type=_argparse_type(tp, opt),
                metavar=None if choices else f.name.upper(),
                help=help_text,
            )


def _argparse_type(tp: Any, opt: str) -> Any:
    def parse(value: str) -> Any:
        try:
            return convert(value, tp, opt)
        except ConfigError as exc:
            # argparse reports ArgumentTypeError as "argument --x: <message>"
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{opt}: ")) from None

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} needs a default")


def config_from_namespace(
    cls: type[T],
    namespace: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    given: set[str] | None = None,
) -> T:
    """Build the dataclass from parsed options, applying environment overrides to options not given."""
    env = os.environ if env is None else env
    given = given or set()
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(namespace, f.name)
        if f.name not in given and env_name(f.name) in env:
            value = convert(env[env_name(f.name)], hints[f.name], env_name(f.name))
        if value is None and get_origin(_unwrap_optional(hints[f.name])[0]) in (list, tuple, Sequence):
            value = _default_of(f)
        if isinstance(value, list) and get_origin(_unwrap_optional(hints[f.name])[0]) is tuple:
            value = tuple(value)
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Field names set explicitly on the command line (they beat the environment)."""
    given: set[str] = set()
    strings = {s: a.dest for a in parser._actions for s in a.option_strings}
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in strings:
            given.add(strings[key])
        elif key.startswith("--no-") and "--" + key[5:] in strings:
            given.add(strings["--" + key[5:]])
    return given


def parse_config(
    cls: type[T], argv: Sequence[str] | None, prog: str, env: Mapping[str, str] | None = None
) -> T:
    """Parse `argv` into a `cls` instance; on a bad value print one line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog)
    namespace = parser.parse_args(argv)
    try:
        return config_from_namespace(cls, namespace, env, _given_options(parser, argv))
    except ConfigError as exc:
        parser.error(str(exc))
