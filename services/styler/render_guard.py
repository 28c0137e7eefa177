"""Bounds on running untrusted template code: a wall-clock deadline and an output size.

Jinja compiles a template to Python bytecode, so a template that loops for ever (nested
`range`s, recursive macros over big inputs) would pin a CPU core for ever. `RenderGuard.run`
runs the work in its own short-lived thread and, past the deadline, raises `RenderTimeoutError`
inside that thread with `PyThreadState_SetAsyncExc` (delivered at the next bytecode boundary,
which Jinja loops hit every iteration), then reports the timeout to the caller. This keeps the
render in-process (no pickling of messages, no process pool to babysit) while still stopping it.
Long single C calls (one huge `json.dumps`) are not interruptible, but their size is bounded by
the request; string repetition is refused up front by the environment (chat_template.py).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RenderTimeoutError(Exception):
    """The work ran past the deadline and was stopped."""


class _Interrupt(BaseException):
    # BaseException, so `except Exception` inside templates' Python helpers cannot swallow it.
    pass


class _Outcome(Generic[T]):
    def __init__(self) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lock = threading.Lock()


class RenderGuard:
    """Runs a callable with a deadline; also carries the output-size bound renderers check."""

    def __init__(self, timeout_s: float, max_output_chars: int) -> None:
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars

    def run(self, fn: Callable[[], T]) -> T:
        outcome: _Outcome[T] = _Outcome()

        def target() -> None:
            try:
                try:
                    result = fn()
                    with outcome.lock:
                        outcome.value = result
                        outcome.done = True
                except _Interrupt:
                    raise
                except BaseException as exc:
                    with outcome.lock:
                        outcome.error = exc
                        outcome.done = True
            except _Interrupt:
                pass  # the caller already reported the timeout

        thread = threading.Thread(target=target, name="styler-render", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        with outcome.lock:
            if not outcome.done:
                outcome.done = True  # from now on the result is ignored
                _interrupt(thread)
                raise RenderTimeoutError(
                    f"chat template rendering took longer than {self.timeout_s:g}s and was stopped"
                )
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[return-value]


def _interrupt(thread: threading.Thread) -> None:
    ident: Any = thread.ident
    if ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Interrupt))
