"""The gateway's half of the worker's GenerateMany: every request's Generate call to a worker
shares one stream per worker connection.

One Generate rpc per request cost, per engine step, one gRPC message per running request on each
side, and on the worker each is a write on the event loop that shares the GIL with its engine.
Here a call is a session on a shared stream (the machinery is `session_mux.py`'s); the worker
answers the chunks of all of the stream's sessions that became ready together (an engine step's)
as one message.

A `GenerateSession` keeps the failures of a per-request Generate rpc, so the router's rules
(worker_stream.py) apply unchanged: a session the worker ends with an error (INVALID_ARGUMENT
naming the field, RESOURCE_EXHAUSTED, INTERNAL, ...) raises that status as an `AioRpcError` and
the other sessions go on; if the stream itself breaks (the worker died: UNAVAILABLE) every session
on it fails with the stream's status, as each one's own rpc would have (UNAVAILABLE too where grpc
reported the break as UNKNOWN or INTERNAL: `session_mux._stream_error`), and the next call opens a
new stream. The request's deadline ends its session with DEADLINE_EXCEEDED, as it ended an rpc.

Packed tokens: the gateway sets `accepts_packed_tokens` on its messages (unless TANDEM_PACKED_TOKENS=0), so the worker sends a
chunk that is one new token of a session's first choice and nothing else as two numbers in the
message's `token_sessions` / `token_ids` (worker.proto). Each becomes that chunk, a `GenerateChunk`
made here (the other chunks stay protobuf for clients.py to convert), handed to its session
before the message's `responses`.
"""

from __future__ import annotations

import time

from gateway.downstream import ChoiceDelta, GenerateChunk
from gateway.session_mux import MuxCounts, MuxSession, SessionMux
from services.common import switches
from tandem.v1 import worker_pb2, worker_pb2_grpc

GenerateMuxCounts = MuxCounts  # the workers' GenerateMany streams' traffic (/metrics)


class GenerateSession(MuxSession[worker_pb2.GenerateResponse | GenerateChunk]):
    """One Generate call on a shared stream: its chunks (`responses`) until it ends, each the
    worker's GenerateResponse, or a GenerateChunk made from a packed token."""

    num_chunks: int = 0  # chunks received (tests: falling back before the first one)
    choice_index: int = 0  # the request's first_choice_index: the choice of its packed tokens

    def _deliver(self, item: worker_pb2.GenerateResponse | GenerateChunk) -> None:
        self.num_chunks += 1
        super()._deliver(item)


class GenerateMux(SessionMux[worker_pb2.GenerateRequest, GenerateSession]):
    """One GenerateMany stream and its sessions. Opened on first use; once it has failed or
    ended (`closed`), the client opens a new one for the next call."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, counts: MuxCounts) -> None:
        super().__init__(stub.GenerateMany, GenerateSession, counts, "worker", "generate")

    def open(self, start: worker_pb2.GenerateRequest, deadline: float | None) -> GenerateSession:
        session = super().open(start, deadline)
        session.choice_index = start.first_choice_index
        return session

    def _start(
        self, session_id: int, start: worker_pb2.GenerateRequest, deadline: float | None
    ) -> worker_pb2.GenerateSessionRequest:
        # The worker ends the session itself when the deadline passes, as a Generate rpc's.
        timeout_ms = 0 if deadline is None else max(1, int((deadline - time.monotonic()) * 1000))
        message = worker_pb2.GenerateSessionStart(request=start, timeout_ms=timeout_ms)
        return worker_pb2.GenerateSessionRequest(session_id=session_id, start=message)

    def _cancel(self, session_id: int) -> worker_pb2.GenerateSessionRequest:
        return worker_pb2.GenerateSessionRequest(session_id=session_id, cancel=True)

    def _batch(self, messages: list[worker_pb2.GenerateSessionRequest]) -> worker_pb2.GenerateManyRequest:
        return worker_pb2.GenerateManyRequest(
            requests=messages, accepts_packed_tokens=switches.PACKED_TOKENS.value
        )

    def _item(self, answer: worker_pb2.GenerateSessionResponse) -> worker_pb2.GenerateResponse | None:
        return answer.chunk if answer.HasField("chunk") else None

    def _deliver_packed(self, message: worker_pb2.GenerateManyResponse) -> int:
        token_sessions = message.token_sessions
        if not token_sessions:
            return 0
        sessions = self._sessions
        for session_id, token_id in zip(token_sessions, message.token_ids, strict=True):
            session = sessions.get(session_id)
            if session is not None:  # (else cancelled or expired meanwhile)
                session._deliver(GenerateChunk((ChoiceDelta(session.choice_index, (token_id,), (), None),)))
        return len(token_sessions)
