"""Many sessions on one bidi stream: what the gateway's styler stream (DetokenizeMany,
detokenize_mux.py) and worker stream (GenerateMany, generate_mux.py) have in common.

One rpc per request cost, per token, a message written and read on each side, each a trip through
grpc's event machinery. Here a request's rpc is a session, an id on a stream that every request to
one peer connection shares: one writer task sends whatever the sessions queued while its previous
write was in flight as ONE message (no timer: on an idle stream a message goes out at once; under
load they batch by themselves), and one reader task hands each answer to its session. The peers
answer the same way.

Both protocols have the same shape, which the generic code relies on: the stream's messages carry
`requests` (up) and `responses` (down), each a session's message with a `session_id`; a session's
last answer has an `end` (a gRPC code and message). What differs (the message types, what an
answer carries, back-pressure, the wording of errors) is a subclass's hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from gateway.grpc_errors import peer_gone

log = logging.getLogger(__name__)

# A stream takes new sessions for this long; then the next session opens a new stream and the old
# one ends after its last session. Behind a balancer that places each rpc on the least busy
# replica (Istio's LEAST_REQUEST), a stream that lived forever would pin all of this gateway's
# traffic to one replica; each new stream is placed anew.
MAX_STREAM_AGE_S = 30.0

_CODES = {code.value[0]: code for code in grpc.StatusCode}

ItemT = TypeVar("ItemT")  # what a session's `responses` yields
StartT = TypeVar("StartT")  # what opens a session
SessionT = TypeVar("SessionT", bound="MuxSession[Any]")


@dataclass
class MuxCounts:
    """Traffic of a client's multiplexed streams, over all the streams it opened."""

    messages_sent: int = 0  # stream messages (to the peer)
    session_messages_sent: int = 0  # session messages in them (start, deltas, close, cancel)
    messages_received: int = 0  # stream messages (from the peer)
    session_messages_received: int = 0  # session answers in them


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


# A stream's own status is never a session's: a session's failure comes as its `end`. A stream
# that fails with UNKNOWN or INTERNAL is a connection torn down under it (grpc_errors.STREAM_REMOVED)
# or the peer's stream handler failing: the peer's failure either way, not one request's. Its
# sessions fail as when the peer is gone (UNAVAILABLE), so the gateway moves them instead of
# answering each one's client with a 500.
_PEER_BROKE = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


def _stream_error(exc: grpc.aio.AioRpcError, peer: str, stream: str) -> grpc.aio.AioRpcError:
    """What the sessions of a stream that failed with `exc` fail with."""
    return peer_gone(exc, f"the {peer}'s {stream} stream broke") if exc.code() in _PEER_BROKE else exc


class MuxSession(Generic[ItemT]):
    """One session on a `SessionMux`: the stand-in for one rpc. Its answers come out of
    `responses` until the peer ends it; it fails as that rpc would have (see `SessionMux`)."""

    def __init__(self, mux: SessionMux[Any, Any], session_id: int) -> None:
        self._mux = mux
        self.session_id = session_id
        # answers; None: the session ended OK (or was cancelled); an error: it failed
        self._answers: asyncio.Queue[ItemT | grpc.aio.AioRpcError | None] = asyncio.Queue()
        self._error: grpc.aio.AioRpcError | None = None  # why it failed
        self._open = True  # the peer still holds it (no end answered, no failure, no cancel)
        self._closing = False  # the caller sent its last message: the peer ends the session itself
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._forward: Callable[[ItemT | grpc.aio.AioRpcError | None], None] | None = None

    def forward(self, put: Callable[[ItemT | grpc.aio.AioRpcError | None], None]) -> None:
        """Hand each answer to `put` as it comes, instead of keeping it for `responses`: None when
        the session ended (OK, or cancelled), the `AioRpcError` when it failed, last. For a caller
        that gathers several sources in one queue: no task of its own woken per answer. Answers
        already kept go to `put` first, in order; `responses` is not used after this."""
        while not self._answers.empty():
            put(self._answers.get_nowait())
        self._forward = put

    async def responses(self) -> AsyncIterator[ItemT]:
        while True:
            item = await self._answers.get()
            if item is None:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield item

    def cancel(self) -> None:
        """Give up on the session: the peer drops it (nothing is sent once it ended or is
        closing); `responses` ends."""
        if self._open and not self._closing:
            self._mux.enqueue(self._mux._cancel(self.session_id))
        self._end(None)

    # ---- called by the mux ----------------------------------------------------------------------

    def _deliver(self, item: ItemT) -> None:
        if self._forward is not None:
            self._forward(item)
        else:
            self._answers.put_nowait(item)

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        if not self._open:
            return
        self._open = False
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._mux.forget(self.session_id)
        if error is not None:
            self._error = error
        if self._forward is not None:
            self._forward(error)
        else:
            self._answers.put_nowait(error)

    def _expire(self) -> None:
        """The request's deadline passed before the peer ended the session."""
        self._deadline_timer = None
        if self._open and not self._closing:
            self._mux.enqueue(self._mux._cancel(self.session_id))
        self._end(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class SessionMux(ABC, Generic[StartT, SessionT]):
    """One multiplexed bidi stream to a peer and the sessions on it, each standing in for one rpc.

    A client holds one mux per peer connection: it calls `open` for each request while
    `takes_sessions()`, else `retire()`s the mux and makes a new one. The stream opens at
    construction, in an empty `contextvars` context: it outlives every request, so it joins no
    request's trace and inherits no request's deadline.

    Guarantees:
    - Ordering: a session's messages reach the peer in the order they were queued (`open`,
      `enqueue`, `send`, `cancel`), and its answers come out of `responses` in the order the peer
      sent them. What all sessions queued while a write was in flight goes out as ONE message.
    - Session failure: a session the peer ends with a non-OK status raises that status (an
      `AioRpcError` with the peer's code and message) from `responses`; the other sessions go on.
    - Stream failure: when the stream breaks (the peer died or restarted), ends (the peer drained
      it), or the reader hits a bug (INTERNAL), every open session fails with that status, as each
      one's own rpc would have, except that a stream the peer broke with UNKNOWN or INTERNAL fails
      them with UNAVAILABLE (`_stream_error`: the peer's failure, not theirs); the mux is then
      `closed`, drops what is queued, and never opens again. `close()` fails the sessions with
      CANCELLED. No session is ever left hanging.
    - Deadline: a session opened with a deadline (time.monotonic()) that the peer has not ended by
      then is cancelled on the peer and fails with DEADLINE_EXCEEDED, as the rpc's deadline would.
    - Cancellation: after `cancel()` the session's `responses` ends, and the peer's later answers
      to it are dropped; nothing is sent for a session that already ended.
    - Retirement: a mux takes new sessions for MAX_STREAM_AGE_S after it opened, until `retire()`
      or until it is `closed`; a retired mux half-closes the stream once its last session ended,
      and the peer then ends the stream.
    - Back-pressure: with `max_queued`, `send` waits while more than that many session messages
      are queued (until the writer takes them or the stream fails), so a peer that stops reading
      slows the callers instead of growing the queue. `enqueue` never waits.

    Subclasses supply the protocol: `_start` (a session's first message), `_cancel` (the message
    that drops a session), `_batch` (the stream message carrying several session messages) and
    `_item` (what an answer hands to its session's `responses`, if anything); and, where a
    stream message carries answers in another form too, `_deliver_packed`.

    Args:
        open_stream: opens the bidi stream (the stub's method, called with no arguments).
        new_session: makes the session object for a session id.
        counts: traffic counters, shared by the client's muxes.
        peer: who answers, for errors and logs ("styler", "worker").
        stream: what the stream does, for errors and logs ("detokenize", "generate").
        max_queued: the back-pressure limit of `send`; None: none.
    """

    def __init__(
        self,
        open_stream: Callable[[], Any],
        new_session: Callable[[SessionMux[StartT, SessionT], int], SessionT],
        counts: MuxCounts,
        peer: str,
        stream: str,
        max_queued: int | None = None,
    ) -> None:
        self._new_session = new_session
        self._counts = counts
        self._peer = peer
        self._stream = stream
        self._max_queued = max_queued
        self._sessions: dict[int, SessionT] = {}
        self._ids = itertools.count(1)
        self._queued: list[Any] = []
        self._wake = asyncio.Event()
        self._room: asyncio.Event | None = None  # set when the writer takes the queue
        self.closed = False
        self._opened_at = time.monotonic()
        self._retired = False  # takes no new sessions; half-closes after its last one
        self._call: Any = contextvars.Context().run(open_stream)
        self._writer = asyncio.create_task(self._write(), context=contextvars.Context())
        self._reader = asyncio.create_task(self._read(), context=contextvars.Context())

    # ---- the protocol (subclasses) --------------------------------------------------------------

    @abstractmethod
    def _start(self, session_id: int, start: StartT, deadline: float | None) -> Any:
        """The session message that opens session `session_id`."""

    @abstractmethod
    def _cancel(self, session_id: int) -> Any:
        """The session message that tells the peer to drop session `session_id`."""

    @abstractmethod
    def _batch(self, messages: list[Any]) -> Any:
        """One stream message carrying `messages` (session messages, in order)."""

    @abstractmethod
    def _item(self, answer: Any) -> Any | None:
        """What `answer` (one session answer) hands to its session; None: nothing (an end only)."""

    def _deliver_packed(self, message: Any) -> int:
        """Hand what `message` carries besides its `responses` to the sessions (before those),
        skipping sessions no longer open; how many session answers that was. None here."""
        return 0

    # ---- the clients' side ----------------------------------------------------------------------

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def takes_sessions(self) -> bool:
        return not (self.closed or self._retired) and time.monotonic() - self._opened_at < MAX_STREAM_AGE_S

    def retire(self) -> None:
        """Take no new sessions; end the stream once the open ones have ended."""
        self._retired = True
        self._wake.set()

    def open(self, start: StartT, deadline: float | None) -> SessionT:
        """A new session; `deadline` (time.monotonic()) ends it with DEADLINE_EXCEEDED."""
        session = self._new_session(self, next(self._ids))
        self._sessions[session.session_id] = session
        self.enqueue(self._start(session.session_id, start, deadline))
        if deadline is not None:
            loop = asyncio.get_running_loop()
            session._deadline_timer = loop.call_at(loop.time() + deadline - time.monotonic(), session._expire)
        return session

    def enqueue(self, message: Any) -> None:
        """Queue a session message for the writer (dropped once the stream is closed)."""
        if self.closed:
            return
        self._queued.append(message)
        self._wake.set()

    async def send(self, message: Any) -> None:
        """`enqueue`, then wait while the queue is over `max_queued`."""
        self.enqueue(message)
        while self._max_queued is not None and len(self._queued) > self._max_queued and not self.closed:
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)
        if self._retired and not self._sessions:
            self._wake.set()  # the writer half-closes the stream

    async def close(self) -> None:
        """End the stream (the client is closing): its sessions fail with CANCELLED."""
        self._fail(_error(grpc.StatusCode.CANCELLED, f"the gateway closed the {self._peer} stream"))
        for task in (self._writer, self._reader):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- the stream's tasks ---------------------------------------------------------------------

    async def _write(self) -> None:
        try:
            while True:
                if not self._queued:
                    if self._retired and not self._sessions:
                        await self._call.done_writing()  # the peer then ends the stream
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
                await self._call.write(self._batch(batch))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream ended: the reader reports why

    async def _read(self) -> None:
        peer, stream = self._peer, self._stream
        try:
            async for message in self._call:
                self._receive(message)
            # The stream ended: retired here, or the peer (draining) ended it after its last session.
            error = _error(grpc.StatusCode.UNAVAILABLE, f"the {peer} ended the {stream} stream")
        except grpc.aio.AioRpcError as exc:
            error = _stream_error(exc, peer, stream)
        except asyncio.CancelledError:  # closed here, or the channel closed under it
            self._fail(_error(grpc.StatusCode.CANCELLED, f"the {peer} stream was cancelled"))
            raise
        except Exception as exc:  # a bug here must fail the sessions, never leave them hanging
            log.exception("the %s's %s stream failed", peer, stream)
            error = _error(grpc.StatusCode.INTERNAL, f"the gateway's {peer} stream failed: {exc}")
        self._fail(error)

    def _receive(self, message: Any) -> None:
        """Hand one stream message's answers to their sessions (what `_deliver_packed` finds
        first), skipping sessions no longer open."""
        counts = self._counts
        counts.messages_received += 1
        counts.session_messages_received += self._deliver_packed(message) + len(message.responses)
        for answer in message.responses:
            session = self._sessions.get(answer.session_id)
            if session is None:
                continue  # cancelled or expired meanwhile
            item = self._item(answer)
            if item is not None:
                session._deliver(item)
            if answer.HasField("end"):
                code = _CODES.get(answer.end.code, grpc.StatusCode.UNKNOWN)
                session._end(None if code == grpc.StatusCode.OK else _error(code, answer.end.message))

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self.closed and self._sessions:
            log.warning(
                "%s %s stream ended (%s: %s); failing its %d session(s)",
                self._peer,
                self._stream,
                error.code().name,
                error.details(),
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
