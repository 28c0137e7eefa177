"""The gateway's half of the styler's DetokenizeMany: every request's detokenize session shares
one stream per styler connection.

The stream machinery (batching writer, reader, retirement, failure) is `session_mux.py`'s; this
is DetokenizeMany's protocol. A `DetokenizeSession` keeps the interface of a per-request stream
(send / responses / done_writing / cancel) and its failures: a session the styler ends with an
error (a bad start option: INVALID_ARGUMENT) raises that `AioRpcError` from `responses` and
`send`, and the other sessions go on; if the stream itself breaks (the styler died or restarted)
every session on it fails with the stream's status, as each one's own stream would have, and the
next session opens a new stream. The request's deadline ends its session with DEADLINE_EXCEEDED,
as it ended a per-request stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.downstream import DetokenizeStart, TextDelta, ToolCallDelta
from gateway.session_mux import MuxCounts as MuxCounts  # (re-exported: the styler clients' counts)
from gateway.session_mux import MuxSession, SessionMux
from tandem.v1 import styler_pb2, styler_pb2_grpc

# Session messages queued (not yet taken by the writer) past which `send` waits for the writer,
# so a styler that stops reading slows the worker streams instead of growing the queue.
MAX_QUEUED = 4096


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


class DetokenizeSession(MuxSession[list[TextDelta]]):
    """One request's detokenize session: token deltas in (`send`), text deltas out (`responses`)."""

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


class DetokenizeMux(SessionMux[DetokenizeStart, DetokenizeSession]):
    """One DetokenizeMany stream and its sessions. Opened on first use; once it has failed or
    ended (`closed`), the client opens a new one for the next session."""

    def __init__(self, stub: styler_pb2_grpc.StylerStub, counts: MuxCounts) -> None:
        super().__init__(stub.DetokenizeMany, DetokenizeSession, counts, "styler", "detokenize", MAX_QUEUED)

    def _start(
        self, session_id: int, start: DetokenizeStart, deadline: float | None
    ) -> styler_pb2.SessionRequest:
        return styler_pb2.SessionRequest(session_id=session_id, start=_start_proto(start))

    def _cancel(self, session_id: int) -> styler_pb2.SessionRequest:
        return styler_pb2.SessionRequest(session_id=session_id, cancel=True)

    def _batch(self, messages: list[styler_pb2.SessionRequest]) -> styler_pb2.DetokenizeManyRequest:
        return styler_pb2.DetokenizeManyRequest(requests=messages)

    def _item(self, answer: styler_pb2.SessionResponse) -> list[TextDelta] | None:
        return [_text_delta(d) for d in answer.deltas] if answer.deltas else None
