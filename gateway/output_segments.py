"""One choice's output as consecutive segments (reasoning, text, tool calls).

The Responses API's output items and Anthropic's content blocks have this one shape: the chat
pipeline's deltas, in order, where a change of kind starts a new segment and each tool call (by
its index) is a segment of its own that its argument deltas extend. `OutputSegments` keeps the
segments and says what each update did to them; each API's builder (responses_api.py,
anthropic.py) turns those events into its own wire events and final object.

    ChoiceUpdate --ChatResult--> chat chunks --OutputSegments--> Opened / Appended events
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.execution import ChoiceUpdate
from gateway.responses import ChatResult

SegmentKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Segment:
    kind: SegmentKind
    text: str = ""  # the text, the reasoning, or the call's arguments so far
    call_id: str = ""  # a tool call's id as the parser gave it ("" when it gave none)
    name: str = ""  # a tool call's function name


@dataclass(frozen=True)
class Opened:
    """Segment `index` started (the one before it, if any, is complete)."""

    index: int


@dataclass(frozen=True)
class Appended:
    """`delta` was added to segment `index`."""

    index: int
    delta: str


SegmentEvent = Opened | Appended


@dataclass
class OutputSegments:
    result: ChatResult  # the chat pipeline's accumulator of this choice (usage, logprobs, ...)
    segments: list[Segment] = field(default_factory=list)
    finish: str | None = None
    matched_stop: str = ""
    _calls: dict[int, int] = field(default_factory=dict)  # tool-call index -> segment index

    def add(self, update: ChoiceUpdate) -> list[SegmentEvent]:
        events: list[SegmentEvent] = []
        for chunk in self.result.add(update):
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("reasoning_content"):
                    events += self._append("reasoning", delta["reasoning_content"])
                if delta.get("content"):
                    events += self._append("text", delta["content"])
                for call in delta.get("tool_calls") or []:
                    events += self._tool_call(call)
        if update.finish_reason is not None:
            self.finish = update.finish_reason
            self.matched_stop = update.matched_stop
        return events

    def _open(self, segment: Segment) -> Opened:
        self.segments.append(segment)
        return Opened(len(self.segments) - 1)

    def _append(self, kind: SegmentKind, text: str) -> list[SegmentEvent]:
        events: list[SegmentEvent] = []
        if not self.segments or self.segments[-1].kind != kind:
            events.append(self._open(Segment(kind)))
        self.segments[-1].text += text
        events.append(Appended(len(self.segments) - 1, text))
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[SegmentEvent]:
        events: list[SegmentEvent] = []
        function = call.get("function", {})
        index = call.get("index", 0)
        if index not in self._calls:
            events.append(
                self._open(Segment("tool_call", call_id=call.get("id") or "", name=function.get("name", "")))
            )
            self._calls[index] = len(self.segments) - 1
        at = self._calls[index]
        arguments = function.get("arguments", "")
        if arguments:
            self.segments[at].text += arguments
            events.append(Appended(at, arguments))
        return events
