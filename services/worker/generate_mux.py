"""The worker's half of GenerateMany: many Generate calls (sessions) over one stream.

A gateway keeps one GenerateMany stream per worker connection instead of one Generate rpc per
request. With one rpc per request, every engine step cost one gRPC message per running request,
each a write through grpc's event machinery on the event loop that shares the GIL with the
engine thread. Here the sessions' chunks that became ready together go out as ONE message: the
engine thread hands a step's outputs to the loop in one call (AsyncEngine._deliver_step), each
session's task turns its output into a chunk and queues it, and the writer task, which runs after
them, sends what queued while its previous write was in flight (no timer: an idle stream sends a
chunk at once; under load a message carries one step's chunks for every session).

Packed tokens: most chunks of a decode step are one new token of a session's first choice and
nothing else. For a caller that set `accepts_packed_tokens` (the gateway does), such a chunk is
two numbers appended to the message's parallel lists `token_sessions` / `token_ids` instead of a
session answer with a chunk and a choice built in it: per session and step, two list appends on
the event loop instead of several protobuf calls. A session's packed tokens come before its
answers in the same message, so once a session has an answer in the next message, its later
chunks there go as answers too (`_answered`). A caller that never set the flag gets every chunk
as an answer.

A session runs exactly what a Generate rpc runs (`generate`: the servicer's admission,
validation, grammar compilation, KV fetch and output loop) against a `SessionContext` instead of
the rpc's context, so it answers the same chunks and ends with the same status: INVALID_ARGUMENT
naming the field, NOT_FOUND for an unknown adapter, RESOURCE_EXHAUSTED when the worker is full,
INTERNAL when the engine failed it. That status ends this session only. A `cancel` from the caller,
its deadline passing, or the stream breaking aborts the session's request in the engine (the
output loop's `finally`).

Admission: each session read is declared to the engine (`AsyncEngine.expect`) until its request
is submitted or the session ends, so the engine thread's next step waits for a message's sessions
to be in its queue instead of starting on the first of them (async_engine.py, "Admission").

Drain: once the server drains, new sessions are refused with UNAVAILABLE ("draining": the gateway
moves them elsewhere at no cost) and the stream ends after its last session, so a drain never
waits on an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

import grpc

from services.common import metrics
from services.common.logging import request_id_var
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)

# What a session runs: the servicer's Generate body, against the session's context.
GenerateFn = Callable[
    [worker_pb2.GenerateRequest, "SessionContext"], AsyncIterator[worker_pb2.GenerateResponse]
]
WriteFn = Callable[[worker_pb2.GenerateManyResponse], Awaitable[None]]

DRAINING = "the worker is draining; retry on another replica"
METHOD = "Worker/Generate"  # what a session counts as in the rpc metrics


class SessionAbort(Exception):
    """A session's `abort`: it ends with this status (what `context.abort` is to an rpc)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# Writes one chunk's fields into the (empty) GenerateResponse it is given.
FillFn = Callable[[worker_pb2.GenerateResponse], object]


def _nothing() -> None:
    pass


def _no_packing(token_id: int) -> bool:
    return False


class SessionContext:
    """What the Generate body uses of an rpc's ServicerContext: `abort` and `time_remaining`;
    and `emit`, which sends one of the session's chunks from outside its task (in order with
    what the task yields: the caller makes sure of that, rpc.py's `take`): the chunk is written
    in place in the next message, by the function `emit` is given. `emit_token` sends, the same
    way, a chunk that is exactly one new token of the request's first choice (`first_choice_index`)
    and nothing else (outputs.single_token) as a packed token; it returns False where the stream
    cannot pack it (its caller reads no packed tokens, or the session already has an answer in
    the next message): the caller then `emit`s the chunk instead."""

    def __init__(
        self,
        deadline: float | None,
        emit: Callable[[FillFn], None],
        admitted: Callable[[], None] = _nothing,
        emit_token: Callable[[int], bool] = _no_packing,
    ) -> None:
        self.deadline = deadline  # time.monotonic(), None: no deadline
        self.emit = emit
        self.emit_token = emit_token
        self.arrived = time.monotonic()  # read off the stream (its queue time starts here)
        # the body calls it once its request is submitted (AsyncEngine.expect: the engine's next
        # step waits for the sessions read with this one); the session's end calls it too
        self.admitted = admitted

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise SessionAbort(code, details)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class _Session:
    def __init__(self, session_id: int, task: asyncio.Task[None]) -> None:
        self.session_id = session_id
        self.task = task
        self.expired = False  # its deadline passed: the task was cancelled for it
        self.deadline_timer: asyncio.TimerHandle | None = None


class GenerateMux:
    """The sessions of one GenerateMany stream; `serve` runs the stream until the caller has
    half-closed it (or it drained) and its last session has ended."""

    def __init__(
        self, generate: GenerateFn, write: WriteFn, expect: Callable[[], Callable[[], None]] | None = None
    ) -> None:
        self._generate = generate
        self._write = write
        self._expect = expect  # AsyncEngine.expect: a session read, its request not yet submitted
        self._sessions: dict[int, _Session] = {}
        # the next message, its session answers built in place as they come (a chunk built on its
        # own, wrapped in a session answer and the batch, was copied into each)
        self._pending = worker_pb2.GenerateManyResponse()
        # its packed tokens, parallel (extended into it when it is sent), and the sessions that
        # have an answer in it (their later chunks there are answers too: packed ones come first)
        self._token_sessions: list[int] = []
        self._token_ids: list[int] = []
        self._answered: set[int] = set()
        self._packs = False  # the caller set accepts_packed_tokens
        self._wake = asyncio.Event()
        self._draining = False
        self._reading = True  # the caller may still send sessions
        self.messages_sent = 0
        self.chunks_emitted = 0  # chunks sent from outside their sessions' tasks (`_emit`, `_emit_token`)
        self.tokens_packed = 0  # of those, chunks sent as packed tokens

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def drain(self) -> None:
        """Refuse new sessions from now on; the stream ends after its last one."""
        self._draining = True
        self._wake.set()

    async def serve(self, requests: AsyncIterator[worker_pb2.GenerateManyRequest]) -> None:
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            await self._run_writer()
            if reader.done() and not reader.cancelled():
                reader.result()  # the caller's stream broke: end with its error
        finally:
            reader.cancel()
            self.close()

    def close(self) -> None:
        """The stream is over: cancel every session (each aborts its request)."""
        for session in self._sessions.values():
            session.task.cancel()
            if session.deadline_timer is not None:
                session.deadline_timer.cancel()
        self._sessions.clear()

    # ---- reading ---------------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[worker_pb2.GenerateManyRequest]) -> None:
        try:
            async for message in requests:
                if message.accepts_packed_tokens:
                    self._packs = True
                for request in message.requests:
                    self._handle(request)
        finally:
            self._reading = False

    def _handle(self, request: worker_pb2.GenerateSessionRequest) -> None:
        sid = request.session_id
        kind = request.WhichOneof("kind")
        session = self._sessions.get(sid)
        if kind == "cancel":
            if session is not None:
                self._forget(session)
                session.task.cancel()
            return
        if kind != "start":
            self._answer_end(
                sid, grpc.StatusCode.INVALID_ARGUMENT, "a session message must set `start` or `cancel`"
            )
            return
        if session is not None:
            self._answer_end(
                sid, grpc.StatusCode.INVALID_ARGUMENT, f"session_id: session {sid} is already open"
            )
            return
        if self._draining:
            self._answer_end(sid, grpc.StatusCode.UNAVAILABLE, DRAINING)
            return
        start = request.start
        deadline = time.monotonic() + start.timeout_ms / 1000 if start.timeout_ms else None
        admitted = self._expect() if self._expect is not None else _nothing
        # Each session in a context of its own: its request id (logs) is its own.
        context = SessionContext(
            deadline,
            functools.partial(self._emit, sid),
            admitted,
            functools.partial(self._emit_token, sid),
        )
        task = asyncio.create_task(self._run(sid, start.request, context), context=contextvars.Context())
        task.add_done_callback(lambda _: admitted())  # refused, failed or cancelled before its submit
        session = _Session(sid, task)
        self._sessions[sid] = session
        if deadline is not None:
            loop = asyncio.get_running_loop()
            session.deadline_timer = loop.call_at(
                loop.time() + deadline - time.monotonic(), self._expire, session
            )

    def _expire(self, session: _Session) -> None:
        session.deadline_timer = None
        session.expired = True
        session.task.cancel()

    # ---- a session -----------------------------------------------------------------------------

    async def _run(self, sid: int, request: worker_pb2.GenerateRequest, context: SessionContext) -> None:
        request_id_var.set(request.request_id or "-")
        code, details = grpc.StatusCode.OK, ""
        started = time.perf_counter()
        try:
            code, details = await self._serve_session(sid, request, context)
        finally:
            _record_call(code, started)
        session = self._sessions.get(sid)
        if session is None:
            return  # cancelled by the caller, or the stream is over: nobody to answer
        self._forget(session)
        self._answer_end(sid, code, details)

    async def _serve_session(
        self, sid: int, request: worker_pb2.GenerateRequest, context: SessionContext
    ) -> tuple[grpc.StatusCode, str]:
        """Stream the session's chunks; its final status."""
        try:
            async for chunk in self._generate(request, context):
                self._answer(sid).chunk.CopyFrom(chunk)
        except SessionAbort as exc:
            return exc.code, exc.details
        except asyncio.CancelledError:
            session = self._sessions.get(sid)
            if session is None or not session.expired:
                return grpc.StatusCode.CANCELLED, ""  # by the caller, or the stream is over
            return grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception as exc:  # a bug here fails this session, never the stream
            log.exception("GenerateMany session %d failed", sid)
            return grpc.StatusCode.INTERNAL, f"the worker failed this request: {exc}"
        return grpc.StatusCode.OK, ""

    def _emit(self, sid: int, fill: FillFn) -> None:
        """A chunk sent from outside the session's task (SessionContext.emit), written in place in
        the next message: dropped once the session was cancelled or its deadline passed, as the
        task's would be."""
        session = self._sessions.get(sid)
        if session is not None and not session.expired:
            self.chunks_emitted += 1
            fill(self._answer(sid).chunk)

    def _emit_token(self, sid: int, token_id: int) -> bool:
        """A chunk of one token of the session's first choice (SessionContext.emit_token), as a
        packed token of the next message: dropped (True) once the session was cancelled or its
        deadline passed; False where it cannot go packed (see the module docstring)."""
        if not self._packs or sid in self._answered:
            return False
        session = self._sessions.get(sid)
        if session is not None and not session.expired:
            self.chunks_emitted += 1
            self.tokens_packed += 1
            self._token_sessions.append(sid)
            self._token_ids.append(token_id)
            self._wake.set()
        return True

    def _forget(self, session: _Session) -> None:
        self._sessions.pop(session.session_id, None)
        if session.deadline_timer is not None:
            session.deadline_timer.cancel()
        if not self._sessions:
            self._wake.set()  # the writer checks whether the stream is over

    def _answer_end(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        end = self._answer(sid).end
        end.SetInParent()  # (an OK end sets only defaults: present all the same)
        end.code, end.message = code.value[0], details

    def _answer(self, sid: int) -> worker_pb2.GenerateSessionResponse:
        """A new (empty) answer of session `sid` in the next message, for the caller to fill."""
        self._wake.set()
        self._answered.add(sid)
        return self._pending.responses.add(session_id=sid)

    # ---- writing -------------------------------------------------------------------------------

    def _over(self) -> bool:
        return not self._sessions and (self._draining or not self._reading)

    def _take_pending(self) -> worker_pb2.GenerateManyResponse:
        """The next message, its packed tokens in it; a new one is pending from now on."""
        message, self._pending = self._pending, worker_pb2.GenerateManyResponse()
        if self._token_sessions:
            message.token_sessions.extend(self._token_sessions)
            message.token_ids.extend(self._token_ids)
            self._token_sessions, self._token_ids = [], []
        self._answered.clear()
        return message

    async def _run_writer(self) -> None:
        while True:
            if not self._pending.responses and not self._token_sessions:
                if self._over():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            message = self._take_pending()
            self.messages_sent += 1
            with contextlib.suppress(asyncio.InvalidStateError):
                await self._write(message)


def _record_call(code: grpc.StatusCode, started: float) -> None:
    """Count a session as the Generate rpc it stands for (`tandem:rpcs_total{method="Worker/Generate"}`
    and its errors and duration), so the worker's rpc metrics mean the same with the mux on."""
    metrics.counter(metrics.RPCS).labels(method=METHOD, code=code.name).inc()
    if code != grpc.StatusCode.OK:
        metrics.counter(metrics.RPC_ERRORS).labels(method=METHOD, code=code.name).inc()
    metrics.histogram(metrics.RPC_DURATION).labels(method=METHOD).observe(time.perf_counter() - started)
