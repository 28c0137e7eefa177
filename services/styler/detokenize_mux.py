"""The styler's half of DetokenizeMany: many detokenize sessions over one stream.

The gateway keeps one DetokenizeMany stream per styler connection instead of one DetokenizeStream
per request, so a token costs one share of a batched message rather than a message, a read and
a write of its own. Each session is what one DetokenizeStream serves (a `DetokenizeSession`);
what differs is the failure scope: a session's bad input ends that session with its status
(INVALID_ARGUMENT naming the field, as DetokenizeStream would end its stream) and never the other
sessions or the stream.

Order: a session's messages are handled in the order they arrive. Small deltas are detokenized
at once on the event loop; a large one goes to the thread pool (detokenize_work.py) while the
other sessions go on, and that session's later messages wait behind it.

Answers: the task that made answers (the stream's reader, or a session's job back from the pool)
writes them itself when no write is in flight, with no hand-off to another task; answers that
became ready while a write was in flight go out together in the next one (`AnswerWriter`).

Drain: once the server drains, new sessions are refused with UNAVAILABLE, and the stream ends
when its last session does, so a drain never waits on an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc

from services.common.logging import request_id_var
from services.styler.detokenize_work import TokenDeltas, add_deltas_now, runs_inline
from services.styler.stream import DetokenizeSession, StreamDelta, StreamOptions
from services.styler.styler import Styler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionMessage:
    """One message of one session (a SessionRequest)."""

    session_id: int
    kind: str  # "start" | "deltas" | "close" | "cancel" ("" when the message set none)
    start: StreamOptions | None = None  # kind "start"
    deltas: TokenDeltas = ()  # kind "deltas"


@dataclass(frozen=True)
class SessionEnd:
    """Why a session ended: the status its own DetokenizeStream would have ended with."""

    code: grpc.StatusCode
    message: str = ""


@dataclass(frozen=True)
class SessionAnswer:
    """Text deltas of one session, and its end on its last answer."""

    session_id: int
    deltas: list[StreamDelta] = field(default_factory=list)
    end: SessionEnd | None = None


class AnswerWriter:
    """Writes a stream's answers, one message at a time."""

    def __init__(self, write: Callable[[list[SessionAnswer]], Awaitable[None]]) -> None:
        self._write = write
        self._ready: list[SessionAnswer] = []
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, answers: list[SessionAnswer]) -> None:
        self._ready.extend(answers)

    async def flush(self) -> None:
        """Write what is ready; when a write is in flight, it takes them when it ends instead."""
        if self._writing:
            return
        self._writing = True
        self._idle.clear()
        try:
            while self._ready:
                batch, self._ready = self._ready, []
                await self._write(batch)
        finally:
            self._writing = False
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Session:
    def __init__(self, session_id: int, stream: DetokenizeSession) -> None:
        self.session_id = session_id
        self.stream = stream
        self.request_id = stream.options.request_id or "-"
        # Messages that arrived while a large delta of this session was in the thread pool.
        self.waiting: deque[SessionMessage] | None = None
        self.ended = False


class DetokenizeMux:
    """The sessions of one DetokenizeMany stream. `handle` takes each incoming batch and puts its
    answers to `writer` (whose `flush` the caller awaits next); `on_drained` is called once the
    stream drains and has no session left."""

    def __init__(
        self, styler: Styler, executor: Executor, writer: AnswerWriter, on_drained: Callable[[], None]
    ) -> None:
        self._styler = styler
        self._executor = executor
        self._writer = writer
        self._on_drained = on_drained
        self._sessions: dict[int, _Session] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def drained(self) -> bool:
        """Draining, and no session is left: the stream may end."""
        return self._draining and not self._sessions

    def drain(self) -> None:
        """Refuse new sessions from now on."""
        self._draining = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.drained():
            self._on_drained()

    def close(self) -> None:
        """The stream is over: drop every session and the work of theirs still in the pool."""
        for session in self._sessions.values():
            session.ended = True
        self._sessions.clear()
        for job in self._jobs:
            job.cancel()

    def handle(self, messages: Sequence[SessionMessage]) -> None:
        answers: list[SessionAnswer] = []
        for message in messages:
            self._handle(message, answers)
        self._writer.put(answers)
        self._check_drained()

    def _handle(self, message: SessionMessage, answers: list[SessionAnswer]) -> None:
        session = self._sessions.get(message.session_id)
        if message.kind == "cancel":
            if session is not None:
                self._end(session)
            return
        if session is not None and session.waiting is not None:
            session.waiting.append(message)
            return
        if message.kind == "start":
            self._start(message, session, answers)
        elif session is None:
            if message.kind != "close":  # a close after the session ended is nothing to answer
                answers.append(_error(message.session_id, "the first message of a session must be `start`"))
        elif message.kind == "close":
            self._end(session)
            answers.append(SessionAnswer(session.session_id, end=SessionEnd(grpc.StatusCode.OK)))
        elif message.kind == "deltas":
            deltas = message.deltas
            if runs_inline(session.stream, deltas):
                self._add(session, lambda: add_deltas_now(session.stream, deltas), answers)
            else:
                session.waiting = deque()
                job = asyncio.create_task(self._in_pool(session, message.deltas))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
        else:
            self._end(session)
            answers.append(_error(session.session_id, "a session message must set one of its kinds"))

    def _start(self, message: SessionMessage, session: _Session | None, answers: list[SessionAnswer]) -> None:
        if session is not None:
            self._end(session)
            answers.append(_error(session.session_id, "`start` may only be sent once"))
            return
        if self._draining:
            end = SessionEnd(grpc.StatusCode.UNAVAILABLE, "the styler is draining; retry on another replica")
            answers.append(SessionAnswer(message.session_id, end=end))
            return
        assert message.start is not None
        token = request_id_var.set(message.start.request_id or "-")
        try:
            stream = self._styler.open_stream(message.start)
        except ValueError as exc:
            answers.append(_error(message.session_id, str(exc)))
            return
        finally:
            request_id_var.reset(token)
        self._sessions[message.session_id] = _Session(message.session_id, stream)

    def _add(
        self, session: _Session, work: Callable[[], list[StreamDelta]], answers: list[SessionAnswer]
    ) -> None:
        """Answer the text deltas `work` makes, or end the session on its error."""
        token = request_id_var.set(session.request_id)
        try:
            out = work()
        except ValueError as exc:  # a bad choice index: the caller's error, ends this session only
            self._end(session)
            answers.append(_error(session.session_id, str(exc)))
            return
        except Exception:
            log.exception("detokenize session %d failed", session.session_id)
            self._end(session)
            answers.append(
                SessionAnswer(
                    session.session_id, end=SessionEnd(grpc.StatusCode.INTERNAL, "the styler failed")
                )
            )
            return
        finally:
            request_id_var.reset(token)
        reply = [d for d in out if not d.is_empty()]
        if reply:
            answers.append(SessionAnswer(session.session_id, reply))

    async def _in_pool(self, session: _Session, deltas: TokenDeltas) -> None:
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        out: list[StreamDelta] = []
        try:
            out = await loop.run_in_executor(self._executor, add_deltas_now, session.stream, deltas)
        except Exception as exc:
            error = exc
        if session.ended:  # cancelled (or the stream closed) meanwhile
            return
        answers: list[SessionAnswer] = []

        def result() -> list[StreamDelta]:
            if error is not None:
                raise error
            return out

        waiting, session.waiting = session.waiting or deque(), None
        self._add(session, result, answers)
        for message in waiting:  # as if they had arrived now (a large delta queues the rest again)
            self._handle(message, answers)
        self._writer.put(answers)
        self._check_drained()
        with contextlib.suppress(Exception):  # a write that fails ends the stream: its reader reports it
            await self._writer.flush()

    def _end(self, session: _Session) -> None:
        session.ended = True
        session.waiting = None
        self._sessions.pop(session.session_id, None)


def _error(session_id: int, message: str) -> SessionAnswer:
    return SessionAnswer(session_id, end=SessionEnd(grpc.StatusCode.INVALID_ARGUMENT, message))
