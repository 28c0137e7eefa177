"""A small pool of render processes: chat templates are untrusted code, so they run outside the
styler's own process, where a hard memory ceiling and a deadline can always be enforced.

Each process (render_worker.py) runs with an address-space limit (RLIMIT_AS): a template that
allocates without bound fails there with MemoryError, and the styler's memory is untouched. A
render that passes the deadline is stopped by killing its process (nothing inside the process
has to cooperate, unlike an exception injected into a thread, which a long C call such as one
huge string operation ignores); a fresh process replaces it. The styler's event loop, health
checks and other renders are not involved meanwhile. Requests travel as plain JSON data and the
processes keep their compiled templates cached, so a normal render costs one pipe round trip.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.styler.render_worker import HEADER, READY

_START_TIMEOUT_S = 60.0  # an interpreter start on a loaded machine
_ROOT = str(Path(__file__).resolve().parents[2])  # where `services` is importable from


class RenderTimeoutError(Exception):
    """The render ran past the deadline; its process was killed."""


class RenderFailure(Exception):
    """The template failed in the render process: its message, the field to blame, the line."""

    def __init__(self, message: str, field: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.line = line


@dataclass(frozen=True)
class RenderLimits:
    timeout_s: float
    max_output_chars: int
    memory_mb: int = 1024
    num_processes: int = 2


class _Process:
    """One render process and its pipes."""

    def __init__(self, memory_mb: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        env["MALLOC_ARENA_MAX"] = "2"  # per-thread malloc arenas would count against RLIMIT_AS
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.styler.render_worker", str(memory_mb)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.stdout_fd = self.proc.stdout.fileno()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the interpreter to start (not part of any render's deadline)."""
        if not self.ready:
            try:
                self.ready = self._read(len(READY), time.monotonic() + timeout_s) == READY
            except RenderTimeoutError:
                return False
        return self.ready

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()

    def close(self) -> None:
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.stdin.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def call(self, request: dict[str, Any], deadline: float) -> dict[str, Any] | None:
        """The reply, or None when the process died; RenderTimeoutError past `deadline`."""
        data = json.dumps(request).encode("ascii")
        try:
            self.stdin.write(HEADER.pack(len(data)) + data)
            self.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        header = self._read(HEADER.size, deadline)
        if header is None:
            return None
        body = self._read(HEADER.unpack(header)[0], deadline)
        return None if body is None else dict(json.loads(body))

    def _read(self, n: int, deadline: float) -> bytes | None:
        chunks: list[bytes] = []
        while n > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout_fd], [], [], left)[0]:
                raise RenderTimeoutError()
            chunk = os.read(self.stdout_fd, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


class RenderPool:
    """Renders in up to `num_processes` processes; thread-safe (callers block for a free one)."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self._idle: list[_Process] = []
        self._started = 0
        self._cond = threading.Condition()
        self._closed = False
        # One process starts now (its interpreter starts while the styler loads); more on demand.
        self._idle.append(_Process(limits.memory_mb))
        self._started = 1

    def render(self, template: str, variables: dict[str, Any]) -> str:
        """The rendered text; RenderFailure or RenderTimeoutError otherwise."""
        request = {
            "template": template,
            "variables": variables,
            "max_output_chars": self.limits.max_output_chars,
        }
        process = self._acquire()
        if not process.wait_ready(_START_TIMEOUT_S):
            self._discard(process)
            raise RuntimeError("a chat-template render process did not start")
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            reply = process.call(request, deadline)
        except RenderTimeoutError:
            self._discard(process)
            raise RenderTimeoutError(
                f"chat template rendering took longer than {self.limits.timeout_s:g}s and was stopped"
            ) from None
        except BaseException:
            self._discard(process)
            raise
        if reply is None:
            # The process died mid-render: only an allocation failure the worker could not
            # even report (or a crash of the interpreter under the memory limit) does that.
            self._discard(process)
            raise RenderFailure("chat template ran out of memory", "chat_template")
        self._release(process)
        if "error" in reply:
            raise RenderFailure(
                str(reply["error"]), str(reply.get("field") or "chat_template"), reply.get("line")
            )
        return str(reply["prompt"])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for process in idle:
            process.kill()

    def _acquire(self) -> _Process:
        with self._cond:
            while True:
                while self._idle:
                    process = self._idle.pop()
                    if process.proc.poll() is None:
                        return process
                    self._started -= 1  # died while idle (killed from outside): start another
                    process.close()
                if self._started < self.limits.num_processes:
                    self._started += 1
                    break
                self._cond.wait()
        try:
            return _Process(self.limits.memory_mb)
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise

    def _release(self, process: _Process) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(process)
                self._cond.notify()
                return
        process.kill()

    def _discard(self, process: _Process) -> None:
        """Kill a process and start its replacement now, so that it is warm when needed."""
        process.kill()
        with self._cond:
            if self._closed:
                self._started -= 1
                return
        try:
            replacement = _Process(self.limits.memory_mb)
        except OSError:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise
        self._release(replacement)
