"""A render process: renders chat templates for the styler, one request at a time.

`python -m services.styler.render_worker MEMORY_MB` reads length-prefixed JSON requests on stdin
and writes one length-prefixed JSON reply per request on its own copy of stdout (fd 1 itself is
pointed at stderr, so nothing else can write into the reply stream). Its address space is capped
at MEMORY_MB (RLIMIT_AS), so a template that allocates without bound gets a MemoryError here
instead of exhausting the styler; a template that runs too long is killed by the styler
(render_pool.py). Compiled templates stay cached in the process across requests.

Once ready it writes one byte, READY.
Request: {"template": str, "variables": {...}, "max_output_chars": int}
Reply:   {"prompt": str} or {"error": str, "field": str, "line": int | null}
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import threading
import time
import types
from collections.abc import Sequence
from typing import Any, BinaryIO

import jinja2

from services.styler.template_sandbox import TemplateLimitError, TemplateSyntaxError, compile_template

HEADER = struct.Struct("!I")
READY = b"R"  # written once, when the process is ready for requests
_TEMPLATE_FILENAME = "<template>"  # what Jinja names a string template's frames


class OutputTooLargeError(ValueError):
    pass


def render(source: str, variables: dict[str, Any], max_output_chars: int) -> str:
    """Render `source` with `variables`, refusing output past `max_output_chars`."""
    template = compile_template(source)
    parts: list[str] = []
    size = 0
    for chunk in template.generate(**variables):
        size += len(chunk)
        if size > max_output_chars:
            raise OutputTooLargeError(f"chat template output exceeds {max_output_chars} characters")
        parts.append(chunk)
    return "".join(parts)


def describe_error(exc: BaseException, messages: Sequence[Any]) -> dict[str, Any]:
    """The reply for a failed render: the message, the request field to blame, the template line."""
    line = _template_line(exc.__traceback__)
    if isinstance(exc, (TemplateSyntaxError, TemplateLimitError, OutputTooLargeError)):
        return {"error": str(exc), "field": "chat_template", "line": None}
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return {"error": str(exc), "field": "chat_template", "line": line}
    if isinstance(exc, RecursionError):
        return {"error": "chat template recursed too deeply", "field": "chat_template", "line": line}
    if isinstance(exc, MemoryError):
        return {"error": "chat template ran out of memory", "field": "chat_template", "line": line}
    # jinja2.TemplateError (raise_exception, undefined names) and Python errors inside the
    # template (TypeError, ...) alike: the template's own message, and the message it was at.
    index = _message_index(exc.__traceback__, messages)
    field = f"messages[{index}]" if index is not None else "messages"
    return {"error": str(exc), "field": field, "line": line}


def _template_frames(tb: types.TracebackType | None) -> list[types.TracebackType]:
    frames = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            frames.append(tb)
        tb = tb.tb_next
    return frames


def _template_line(tb: types.TracebackType | None) -> int | None:
    # Jinja rewrites tracebacks so that template frames carry template line numbers.
    frames = _template_frames(tb)
    return frames[-1].tb_lineno if frames else None


def _message_index(tb: types.TracebackType | None, messages: Sequence[Any]) -> int | None:
    """The message the template was looking at: a template local that is one of `messages`."""
    for frame in reversed(_template_frames(tb)):
        for value in frame.tb_frame.f_locals.values():
            for i, message in enumerate(messages):
                if value is message:
                    return i
    return None


def handle(request: dict[str, Any]) -> dict[str, Any]:
    variables = request["variables"]
    try:
        return {"prompt": render(request["template"], variables, request["max_output_chars"])}
    except Exception as exc:
        return describe_error(exc, variables.get("messages") or [])


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _exit_with_parent() -> None:
    """Exit when the styler is gone, even in the middle of a render (the styler kills a late
    render itself; this covers the styler being killed). PR_SET_PDEATHSIG would follow the
    styler thread that started this process, not the styler, so a watchdog thread polls."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    memory_bytes = int(argv[0]) * 1024 * 1024
    _exit_with_parent()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    replies.write(READY)
    replies.flush()
    requests = sys.stdin.buffer
    while True:
        header = _read_exact(requests, HEADER.size)
        if header is None:
            return 0
        body = _read_exact(requests, HEADER.unpack(header)[0])
        if body is None:
            return 0
        try:
            reply = handle(json.loads(body))
            data = json.dumps(reply).encode("ascii")
        except MemoryError:
            data = json.dumps({"error": "chat template ran out of memory", "field": "chat_template"}).encode()
        replies.write(HEADER.pack(len(data)) + data)
        replies.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
