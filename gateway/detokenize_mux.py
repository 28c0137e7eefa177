"""The gateway's half of the styler's DetokenizeMany: every request's detokenize session shares
one stream per styler connection.

One DetokenizeStream per request cost, per token, a message written and read on each side, each
a trip through grpc's event machinery. Here a session is an id on a shared stream: one writer
task sends whatever the sessions queued while its previous write was in flight as ONE message
(no timer: on an idle stream a delta goes out at once; under load they batch by themselves), and
one reader task hands each answer to its session. The styler answers the same way.

A `DetokenizeSession` keeps the interface of a per-request stream (send / responses /
done_writing / cancel) and its failures: a session the styler ends with an error (a bad start
option: INVALID_ARGUMENT) raises that `AioRpcError` from `responses` and `send`, and the other
sessions go on; if the stream itself breaks (the styler died or restarted) every session on it
fails with the stream's status, as each one's own stream would have, and the next session opens
a new stream. The request's deadline ends its session with DEADLINE_EXCEEDED, as it ended a
per-request stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.downstream import DetokenizeStart, TextDelta, ToolCallDelta
from tandem.v1 import styler_pb2, styler_pb2_grpc

log = logging.getLogger(__name__)

# Session messages queued (not yet taken by the writer) past which `send` waits for the writer,
# so a styler that stops reading slows the worker streams instead of growing the queue.
MAX_QUEUED = 4096

# A stream takes new sessions for this long; then the next session opens a new stream and the old
# one ends after its last session. Behind a balancer that places each rpc on the least busy
# styler replica (Istio's LEAST_REQUEST), a stream that lived forever would pin all of this
# gateway's detokenizing to one replica; each new stream is placed anew.
MAX_STREAM_AGE_S = 30.0

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class MuxCounts:
    """Traffic of a styler client's detokenize streams, over all the streams it opened."""

    messages_sent: int = 0  # DetokenizeManyRequest messages
    session_messages_sent: int = 0  # session messages in them (start, deltas, close, cancel)
    messages_received: int = 0  # DetokenizeManyResponse messages


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _text_delta(d: styler_pb2.TextDelta) -> TextDelta:
    return TextDelta(
        index=d.index,
        text=d.text,
        reasoning_text=d.reasoning_text,
        tool_calls=tuple(ToolCallDelta(t.index, t.id, t.name, t.arguments) for t in d.tool_calls),
        stopped=d.stopped,
        finished=d.finished,
        num_tokens=d.num_tokens,
        matched_stop=d.matched_stop,
    )


def _start_proto(start: DetokenizeStart) -> styler_pb2.DetokenizeStreamStart:
    return styler_pb2.DetokenizeStreamStart(
        request_id=start.request_id,
        prompt_token_ids=list(start.prompt_token_ids),
        skip_special_tokens=start.skip_special_tokens,
        stop=list(start.stop),
        include_stop_str_in_output=start.include_stop_str_in_output,
        tool_parser=start.tool_parser,
        reasoning_parser=start.reasoning_parser,
        num_choices=start.num_choices,
        first_choice_index=start.first_choice_index,
        prompt_opens_reasoning=start.prompt_opens_reasoning,
    )


class DetokenizeSession:
    """One request's detokenize session: token deltas in (`send`), text deltas out (`responses`)."""

    def __init__(self, mux: DetokenizeMux, session_id: int) -> None:
        self._mux = mux
        self.session_id = session_id
        # text deltas; None: the session ended; an error: it failed
        self._answers: asyncio.Queue[list[TextDelta] | grpc.aio.AioRpcError | None] = asyncio.Queue()
        self._error: grpc.aio.AioRpcError | None = None
        self._open = True  # the styler still holds it (no end answered, no failure, no cancel)
        self._closing = False  # `close` was sent
        self._deadline_timer: asyncio.TimerHandle | None = None

    async def send(self, deltas: Sequence[tuple[int, Sequence[int], bool]]) -> None:
        """Send (choice index, new token ids, finished) for one or more choices."""
        if self._error is not None:
            raise self._error
        if not self._open or self._closing:
            return  # the session is over (cancelled): nothing reads its text any more
        await self._mux.send(
            styler_pb2.SessionRequest(
                session_id=self.session_id,
                deltas=styler_pb2.TokenDeltas(
                    deltas=[
                        styler_pb2.TokenDelta(index=i, token_ids=ids, finished=done)
                        for i, ids, done in deltas
                    ]
                ),
            )
        )

    async def done_writing(self) -> None:
        """No more deltas: the styler flushes and ends the session (`responses` then ends)."""
        if self._open and not self._closing:
            self._closing = True
            self._mux.enqueue(styler_pb2.SessionRequest(session_id=self.session_id, close=True))

    async def responses(self) -> AsyncIterator[list[TextDelta]]:
        while True:
            item = await self._answers.get()
            if item is None:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield item

    def cancel(self) -> None:
        """Give up on the session (the styler drops it); its `responses` end."""
        if self._open and not self._closing:
            self._mux.enqueue(styler_pb2.SessionRequest(session_id=self.session_id, cancel=True))
        self._end(None)

    # ---- called by the mux ----------------------------------------------------------------------

    def _deliver(self, deltas: list[TextDelta]) -> None:
        self._answers.put_nowait(deltas)

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        if not self._open:
            return
        self._open = False
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._mux.forget(self.session_id)
        if error is not None:
            self._error = error
        self._answers.put_nowait(error)

    def _expire(self) -> None:
        """The request's deadline passed before the styler ended the session."""
        self._deadline_timer = None
        if self._open and not self._closing:
            self._mux.enqueue(styler_pb2.SessionRequest(session_id=self.session_id, cancel=True))
        self._end(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class DetokenizeMux:
    """One DetokenizeMany stream and its sessions. Opened on first use; once it has failed or
    ended (`closed`), the client opens a new one for the next session."""

    def __init__(self, stub: styler_pb2_grpc.StylerStub, counts: MuxCounts) -> None:
        self._counts = counts
        self._sessions: dict[int, DetokenizeSession] = {}
        self._ids = itertools.count(1)
        self._queued: list[styler_pb2.SessionRequest] = []
        self._wake = asyncio.Event()
        self._room: asyncio.Event | None = None  # set when the writer takes the queue
        self.closed = False
        self._opened_at = time.monotonic()
        self._retired = False  # takes no new sessions; half-closes after its last one
        # The stream outlives every request: open it outside the caller's context, so it joins no
        # request's trace and inherits no request's deadline.
        empty = contextvars.Context()
        self._call: Any = empty.run(stub.DetokenizeMany)
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

    def open(self, start: DetokenizeStart, deadline: float | None) -> DetokenizeSession:
        """A new session; `deadline` (time.monotonic()) ends it with DEADLINE_EXCEEDED."""
        session = DetokenizeSession(self, next(self._ids))
        self._sessions[session.session_id] = session
        self.enqueue(styler_pb2.SessionRequest(session_id=session.session_id, start=_start_proto(start)))
        if deadline is not None:
            loop = asyncio.get_running_loop()
            session._deadline_timer = loop.call_at(loop.time() + deadline - time.monotonic(), session._expire)
        return session

    def enqueue(self, request: styler_pb2.SessionRequest) -> None:
        if self.closed:
            return
        self._queued.append(request)
        self._wake.set()

    async def send(self, request: styler_pb2.SessionRequest) -> None:
        self.enqueue(request)
        while len(self._queued) > MAX_QUEUED and not self.closed:
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)
        if self._retired and not self._sessions:
            self._wake.set()  # the writer half-closes the stream

    async def close(self) -> None:
        """End the stream (the client is closing): its sessions fail with CANCELLED."""
        self._fail(_error(grpc.StatusCode.CANCELLED, "the gateway closed the styler stream"))
        for task in (self._writer, self._reader):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _write(self) -> None:
        try:
            while True:
                if not self._queued:
                    if self._retired and not self._sessions:
                        await self._call.done_writing()  # the styler then ends the stream
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, self._queued = self._queued, []
                if self._room is not None:
                    self._room.set()
                    self._room = None
                self._counts.messages_sent += 1
                self._counts.session_messages_sent += len(batch)
                await self._call.write(styler_pb2.DetokenizeManyRequest(requests=batch))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream ended: the reader reports why

    async def _read(self) -> None:
        try:
            async for message in self._call:
                self._counts.messages_received += 1
                for answer in message.responses:
                    session = self._sessions.get(answer.session_id)
                    if session is None:
                        continue  # cancelled or expired meanwhile
                    if answer.deltas:
                        session._deliver([_text_delta(d) for d in answer.deltas])
                    if answer.HasField("end"):
                        code = _CODES.get(answer.end.code, grpc.StatusCode.UNKNOWN)
                        session._end(None if code == grpc.StatusCode.OK else _error(code, answer.end.message))
            # The stream ended: retired here, or the styler (draining) ended it after its last session.
            error = _error(grpc.StatusCode.UNAVAILABLE, "the styler ended the detokenize stream")
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:  # closed here, or the channel closed under it
            self._fail(_error(grpc.StatusCode.CANCELLED, "the styler stream was cancelled"))
            raise
        except Exception as exc:  # a bug here must fail the sessions, never leave them hanging
            log.exception("the styler's detokenize stream failed")
            error = _error(grpc.StatusCode.INTERNAL, f"the gateway's styler stream failed: {exc}")
        self._fail(error)

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self.closed and self._sessions:
            log.warning(
                "styler detokenize stream ended (%s); failing its %d session(s)",
                error.code().name,
                len(self._sessions),
            )
        self.closed = True
        self._queued = []
        if self._room is not None:
            self._room.set()
        for session in list(self._sessions.values()):
            session._end(error)
        self._sessions.clear()
        self._writer.cancel()
        self._call.cancel()
