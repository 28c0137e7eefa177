"""The text a forced tool choice generates -> OpenAI tool-call deltas, incrementally (per choice).

    named      the whole output is the function's arguments: the first delta carries the call's
               id, type and name with the first piece of text, later deltas the next pieces.
    required   the output is `[{"name": ..., "parameters": {...}}, ...]` (see tool_schema.py),
               parsed as it grows: a call is announced (id, type, name) as soon as its name is
               complete, its arguments (`json.dumps` of "parameters", see json_stream.py) follow
               piece by piece. Arguments generated before the name wait for it.

Streaming and non-streaming responses run the same conversion over the same text, so the streamed
deltas concatenated equal the whole response's calls.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.downstream import ToolCallDelta
from gateway.execution import ChoiceUpdate
from gateway.json_stream import JsonLexer, Token, canonical
from gateway.tool_schema import ForcedToolChoice

log = logging.getLogger(__name__)


class _Deltas:
    """Collects deltas, merging consecutive argument pieces of one call into one delta."""

    def __init__(self) -> None:
        self.items: list[ToolCallDelta] = []

    def add(self, index: int, arguments: str, call_id: str = "", name: str = "") -> None:
        last = self.items[-1] if self.items else None
        if not call_id and last is not None and last.index == index:
            self.items[-1] = dataclasses.replace(last, arguments=last.arguments + arguments)
        elif call_id or arguments:
            self.items.append(ToolCallDelta(index, call_id, name, arguments))


class NamedCall:
    """tool_choice {"type": "function", "function": {"name": N}}: the text is N's arguments."""

    def __init__(self, name: str, new_id: Callable[[], str]) -> None:
        self.name = name
        self._new_id = new_id
        self.announced = False
        self.complete = False

    def feed(self, text: str) -> list[ToolCallDelta]:
        out = _Deltas()
        if text and not self.announced:
            self.announced = True
            out.add(0, text, self._new_id(), self.name)
        elif text:
            out.add(0, text)
        return out.items

    def finish(self) -> list[ToolCallDelta]:
        self.complete = True
        if self.announced:
            return []
        self.announced = True  # no text at all: the call is still there, with empty arguments
        return [ToolCallDelta(0, self._new_id(), self.name, "")]


@dataclass
class _Call:
    index: int = -1  # its index among the message's tool calls, once announced
    name: list[str] = field(default_factory=list)
    name_done: bool = False
    pending: list[str] = field(default_factory=list)  # arguments generated before the name


class RequiredCalls:
    """tool_choice "required": the text is a JSON array of {"name", "parameters"} objects."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._lexer = JsonLexer()
        self._stack: list[str] = []  # open containers: "[" or "{"
        self._call: _Call | None = None  # the call whose object is open
        self._key: list[str] = []  # the call object's current key
        self._state = (
            "start"  # "start" | "calls" | "key" | "key_string" | "colon" | "value" | "after" | "done"
        )
        self._sink = ""  # the value being read: "name" | "parameters" | "skip"
        self._value_depth = 0  # stack depth at which the value being read ends
        self._in_value_string = False
        self.num_calls = 0
        self.complete = False  # the array is closed
        self.broken = False  # the text stopped being the expected JSON; nothing more is parsed

    def feed(self, text: str) -> list[ToolCallDelta]:
        out = _Deltas()
        if self.broken:
            return []
        try:
            for token in self._lexer.feed(text):
                self._token(token, out)
        except ValueError as exc:
            self.broken = True
            log.warning("tool_choice 'required': the output is not the expected JSON (%s)", exc)
        return out.items

    def finish(self) -> list[ToolCallDelta]:
        out = _Deltas()
        if not self.broken:
            try:
                for token in self._lexer.finish():
                    self._token(token, out)
            except ValueError:
                self.broken = True
        return out.items

    def _fail(self, what: str) -> None:
        raise ValueError(f"{what} in state {self._state}")

    def _announce(self, call: _Call, out: _Deltas) -> None:
        call.index = self.num_calls
        self.num_calls += 1
        out.add(call.index, "".join(call.pending), self._new_id(), "".join(call.name))
        call.pending = []

    def _value_token(self, token: Token, out: _Deltas) -> None:
        """A token of the value of the call object's current key."""
        call = self._call
        assert call is not None
        if self._sink == "parameters":
            piece = canonical(token)
            if call.index >= 0:
                out.add(call.index, piece)
            else:
                call.pending.append(piece)
        elif self._sink == "name" and token.kind == "string_piece" and len(self._stack) == 2:
            call.name.append(token.text)

    def _value_done(self, out: _Deltas) -> None:
        call = self._call
        assert call is not None
        if self._sink == "name" and not call.name_done:
            call.name_done = True
            self._announce(call, out)
        self._state = "after"

    def _token(self, token: Token, out: _Deltas) -> None:
        kind, text = token.kind, token.text
        state = self._state
        if state == "value":
            self._value_token(token, out)
            depth = len(self._stack)
            if kind == "string_start":
                self._in_value_string = True
            elif kind == "string_end":
                self._in_value_string = False
                if depth == self._value_depth:
                    self._value_done(out)
            elif kind == "scalar":
                if depth == self._value_depth:
                    self._value_done(out)
            elif kind == "punct" and text in "[{":
                self._stack.append(text)
            elif kind == "punct" and text in "]}":
                if depth == self._value_depth or {"]": "[", "}": "{"}[text] != self._stack[-1]:
                    self._fail(f"unexpected {text!r}")
                self._stack.pop()
                if len(self._stack) == self._value_depth:
                    self._value_done(out)
            elif kind == "punct" and depth == self._value_depth:
                self._fail(f"unexpected {text!r}")
            return
        if state == "start":
            if (kind, text) != ("punct", "["):
                self._fail("expected '['")
            self._stack.append("[")
            self._state = "calls"
        elif state == "calls":
            if (kind, text) == ("punct", "{"):
                self._stack.append("{")
                self._call = _Call()
                self._state = "key"
            elif (kind, text) == ("punct", "]"):
                self._stack.pop()
                self._state = "done"
                self.complete = True
            elif (kind, text) != ("punct", ","):
                self._fail("expected a call object")
        elif state == "key":
            if kind == "string_start":
                self._key = []
                self._state = "key_string"
            elif (kind, text) == ("punct", "}"):
                self._end_call(out)
            else:
                self._fail("expected a key")
        elif state == "key_string":
            if kind == "string_piece":
                self._key.append(text)
            elif kind == "string_end":
                self._state = "colon"
        elif state == "colon":
            if (kind, text) != ("punct", ":"):
                self._fail("expected ':'")
            key = "".join(self._key)
            self._sink = key if key in ("name", "parameters") else "skip"
            self._value_depth = len(self._stack)
            self._state = "value"
        elif state == "after":
            if (kind, text) == ("punct", ","):
                self._state = "key"
            elif (kind, text) == ("punct", "}"):
                self._end_call(out)
            else:
                self._fail("expected ',' or '}'")
        else:  # "done": nothing may follow the array
            self._fail("text after the array")

    def _end_call(self, out: _Deltas) -> None:
        call = self._call
        assert call is not None
        self._stack.pop()
        self._call = None
        self._state = "calls"
        if call.index < 0:  # the schema requires a name; without one there is no call to report
            log.warning("tool_choice 'required': a call without a name was dropped")


class ForcedCalls:
    """One choice of a forced tool choice: its `ChoiceUpdate`s with the text turned into calls."""

    def __init__(self, choice: ForcedToolChoice, new_id: Callable[[], str]) -> None:
        self.choice = choice
        self.parser: NamedCall | RequiredCalls = (
            NamedCall(choice.name, new_id) if choice.mode == "named" else RequiredCalls(new_id)
        )

    def convert(self, update: ChoiceUpdate) -> ChoiceUpdate:
        deltas = self.parser.feed(update.text)
        finish = update.finish_reason
        if finish is not None:
            deltas += self.parser.finish()
            # OpenAI (and vLLM since #25054): a forced named function finishes with "stop", like
            # plain text; "required" with "tool_calls". A cut-off output keeps its own reason
            # ("length"), so a truncated call is never reported as a complete one.
            if self.choice.mode == "required" and finish == "stop" and self.parser.complete:
                finish = "tool_calls"
        return dataclasses.replace(update, text="", tool_calls=tuple(deltas), finish_reason=finish)
