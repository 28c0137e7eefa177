"""The gateway's half of the worker's GenerateMany: every request's Generate call to a worker
shares one stream per worker connection.

One Generate rpc per request cost, per engine step, one gRPC message per running request on each
side, and on the worker each is a write on the event loop that shares the GIL with its engine.
Here a call is a session, an id on a shared stream; the worker answers the chunks of all of the
stream's sessions that became ready together (an engine step's) as one message, and one reader
task here hands each chunk to its session. The writer task sends the starts and cancels that
queued while its previous write was in flight as one message (no timer).

A `GenerateSession` keeps the failures of a per-request Generate rpc, so the router's rules
(worker_stream.py) apply unchanged: a session the worker ends with an error (INVALID_ARGUMENT
naming the field, RESOURCE_EXHAUSTED, INTERNAL, ...) raises that status as an `AioRpcError` and
the other sessions go on; if the stream itself breaks (the worker died: UNAVAILABLE) every session
on it fails with the stream's status, as each one's own rpc would have, and the next call opens a
new stream. The request's deadline ends its session with DEADLINE_EXCEEDED, as it ended an rpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.detokenize_mux import MAX_STREAM_AGE_S
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class GenerateMuxCounts:
    """Traffic of the workers' GenerateMany streams, over all the streams opened."""

    messages_sent: int = 0  # GenerateManyRequest messages (to the workers)
    session_messages_sent: int = 0  # session messages in them (start, cancel)
    messages_received: int = 0  # GenerateManyResponse messages (from the workers)
    session_messages_received: int = 0  # session answers in them (chunks, ends)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class GenerateSession:
    """One Generate call on a shared stream: its chunks (`responses`) until it ends."""

    def __init__(self, mux: GenerateMux, session_id: int) -> None:
        self._mux = mux
        self.session_id = session_id
        # chunks; None: the session ended OK; an error: it failed
        self._answers: asyncio.Queue[worker_pb2.GenerateResponse | grpc.aio.AioRpcError | None] = (
            asyncio.Queue()
        )
        self._open = True  # the worker still runs it (no end answered, no failure, no cancel)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.num_chunks = 0  # chunks received (tests: falling back before the first one)

    async def responses(self) -> AsyncIterator[worker_pb2.GenerateResponse]:
        while True:
            item = await self._answers.get()
            if item is None:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield item

    def cancel(self) -> None:
        """Give up on the call: the worker aborts its request (nothing when it already ended)."""
        if self._open:
            self._mux.enqueue(worker_pb2.GenerateSessionRequest(session_id=self.session_id, cancel=True))
        self._end(None)

    # ---- called by the mux ----------------------------------------------------------------------

    def _deliver(self, chunk: worker_pb2.GenerateResponse) -> None:
        self.num_chunks += 1
        self._answers.put_nowait(chunk)

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        if not self._open:
            return
        self._open = False
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._mux.forget(self.session_id)
        self._answers.put_nowait(error)

    def _expire(self) -> None:
        """The request's deadline passed before the worker ended the session."""
        self._deadline_timer = None
        if self._open:
            self._mux.enqueue(worker_pb2.GenerateSessionRequest(session_id=self.session_id, cancel=True))
        self._end(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class GenerateMux:
    """One GenerateMany stream and its sessions. Opened on first use; once it has failed or
    ended (`closed`), the client opens a new one for the next call."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, counts: GenerateMuxCounts) -> None:
        self._counts = counts
        self._sessions: dict[int, GenerateSession] = {}
        self._ids = itertools.count(1)
        self._queued: list[worker_pb2.GenerateSessionRequest] = []
        self._wake = asyncio.Event()
        self.closed = False
        self._opened_at = time.monotonic()
        self._retired = False  # takes no new sessions; half-closes after its last one
        # The stream outlives every request: open it outside the caller's context, so it joins no
        # request's trace and inherits no request's deadline.
        empty = contextvars.Context()
        self._call: Any = empty.run(stub.GenerateMany)
        self._writer = asyncio.create_task(self._write(), context=contextvars.Context())
        self._reader = asyncio.create_task(self._read(), context=contextvars.Context())

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def takes_sessions(self) -> bool:
        return not (self.closed or self._retired) and time.monotonic() - self._opened_at < MAX_STREAM_AGE_S

    def retire(self) -> None:
        """Take no new sessions; end the stream once the open ones have ended."""
        self._retired = True
        self._wake.set()

    def open(self, request: worker_pb2.GenerateRequest, deadline: float | None) -> GenerateSession:
        """A new session for `request`; `deadline` (time.monotonic()) ends it with DEADLINE_EXCEEDED."""
        session = GenerateSession(self, next(self._ids))
        self._sessions[session.session_id] = session
        timeout_ms = 0
        if deadline is not None:
            timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
            loop = asyncio.get_running_loop()
            session._deadline_timer = loop.call_at(loop.time() + deadline - time.monotonic(), session._expire)
        start = worker_pb2.GenerateSessionStart(request=request, timeout_ms=timeout_ms)
        self.enqueue(worker_pb2.GenerateSessionRequest(session_id=session.session_id, start=start))
        return session

    def enqueue(self, request: worker_pb2.GenerateSessionRequest) -> None:
        if self.closed:
            return
        self._queued.append(request)
        self._wake.set()

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)
        if self._retired and not self._sessions:
            self._wake.set()  # the writer half-closes the stream

    async def close(self) -> None:
        """End the stream (the client is closing): its sessions fail with CANCELLED."""
        self._fail(_error(grpc.StatusCode.CANCELLED, "the gateway closed the worker stream"))
        for task in (self._writer, self._reader):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _write(self) -> None:
        try:
            while True:
                if not self._queued:
                    if self._retired and not self._sessions:
                        await self._call.done_writing()  # the worker then ends the stream
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, self._queued = self._queued, []
                self._counts.messages_sent += 1
                self._counts.session_messages_sent += len(batch)
                await self._call.write(worker_pb2.GenerateManyRequest(requests=batch))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream ended: the reader reports why

    async def _read(self) -> None:
        try:
            async for message in self._call:
                counts = self._counts
                counts.messages_received += 1
                counts.session_messages_received += len(message.responses)
                for answer in message.responses:
                    session = self._sessions.get(answer.session_id)
                    if session is None:
                        continue  # cancelled or expired meanwhile
                    if answer.HasField("chunk"):
                        session._deliver(answer.chunk)
                    if answer.HasField("end"):
                        code = _CODES.get(answer.end.code, grpc.StatusCode.UNKNOWN)
                        session._end(None if code == grpc.StatusCode.OK else _error(code, answer.end.message))
            # The stream ended: retired here, or the worker (draining) ended it after its last session.
            error = _error(grpc.StatusCode.UNAVAILABLE, "the worker ended the generate stream")
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:  # closed here, or the channel closed under it
            self._fail(_error(grpc.StatusCode.CANCELLED, "the worker stream was cancelled"))
            raise
        except Exception as exc:  # a bug here must fail the sessions, never leave them hanging
            log.exception("the worker's generate stream failed")
            error = _error(grpc.StatusCode.INTERNAL, f"the gateway's worker stream failed: {exc}")
        self._fail(error)

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self.closed and self._sessions:
            log.warning(
                "worker generate stream ended (%s: %s); failing its %d session(s)",
                error.code().name,
                error.details(),
                len(self._sessions),
            )
        self.closed = True
        self._queued = []
        for session in list(self._sessions.values()):
            session._end(error)
        self._sessions.clear()
        self._writer.cancel()
        self._call.cancel()
