"""Untrusted JSON text -> Python values, or a 400 naming the field.

Two things a client can send that `json.loads` accepts but that break code further on:

- Nesting: `[[[...]]]` 100,000 deep makes `json.loads` (and every recursive walk after it, in
  the gateway, the styler and the worker's grammar compiler) raise `RecursionError`. Values may
  nest at most `MAX_JSON_DEPTH` levels.
- Lone UTF-16 surrogates: `"\\ud800"` is valid JSON but not encodable as UTF-8, so the first
  protobuf field or socket write that carries it raises `UnicodeEncodeError`.

`loads` checks both: the HTTP body once (`routes/body.py`, so every field is covered, with its
path in `param`, e.g. `messages[0].content`), and JSON carried as text inside a request
(`guided_json`, the gRPC API's `*_json` fields) under that field's name. The walk is iterative
and runs only when the raw text could hold a problem (enough brackets, a `\\uD8xx`-`\\uDFxx`
escape), so ordinary bodies pay two `bytes.count` calls and one regex search.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.errors import invalid, one_line

# Deep enough for any real JSON schema, tool list or message list; shallow enough that no
# recursive code downstream comes near Python's recursion limit.
MAX_JSON_DEPTH = 64

# A lone surrogate can only arrive as a \u escape (raw UTF-8 cannot encode one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Keys in a `param` path are cut to this length (a key is client input too).
_MAX_KEY_CHARS = 40


def loads(text: str | bytes, param: str | None = None) -> Any:
    """Parse JSON text; a 400 naming `param` (or the offending path inside it) when it is not
    valid JSON, nests deeper than `MAX_JSON_DEPTH` or holds a lone surrogate."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    what = f"'{param}'" if param else "request body"
    try:
        value = json.loads(raw)
    except RecursionError:
        raise invalid(
            f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels", param or _top_level_key(raw)
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"{what} is not valid JSON: {one_line(str(exc), 200)}", param) from None
    deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    if deep or _SURROGATE_ESCAPE.search(raw) is not None:
        check(value, param or "")
    return value


def check(value: Any, root: str = "") -> None:
    """Refuse a value nested deeper than `MAX_JSON_DEPTH` or holding a lone surrogate in any
    string or key (iteratively: the value may be as deep as the parser allowed). `param` is
    `root` when given (JSON text inside a field), else the path (`messages[0].content`)."""
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                raise invalid(
                    f"'{path or 'request body'}' holds a lone UTF-16 surrogate (not valid Unicode text)",
                    root or path or None,
                )
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            top = root or _first_component(path)
            raise invalid(f"'{top}' nests JSON deeper than {MAX_JSON_DEPTH} levels", top or None)
        if isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item) if _walks(v))
            continue
        for key, v in item.items():
            name = key if len(key) <= _MAX_KEY_CHARS else key[:_MAX_KEY_CHARS] + "..."
            child = f"{path}.{name}" if path else name
            if _SURROGATE.search(key) is not None:
                raise invalid(
                    f"a key in '{path or 'request body'}' holds a lone UTF-16 surrogate", root or path or None
                )
            if _walks(v):
                stack.append((v, child, depth + 1))


def _walks(value: Any) -> bool:
    return isinstance(value, (str, dict, list))


def _first_component(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _top_level_key(raw: bytes) -> str | None:
    """The top-level key whose value starts the too-deep nesting (the field to name), or None.

    Only on the error path: a scan over strings and brackets that stops at the limit."""
    depth = 0
    key: str | None = None
    for match in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', raw):
        token = match.group()
        if token[:1] == b'"':
            if depth == 1:
                key = token[1:-1].decode("utf-8", "replace")[:_MAX_KEY_CHARS]
            continue
        depth += 1 if token in (b"[", b"{") else -1
        if depth > MAX_JSON_DEPTH:
            return key
    return key
