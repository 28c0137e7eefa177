"""gpt-oss's `harmony` output format, parsed incrementally: reasoning, content and tool calls.

The model writes a sequence of messages after the generation prompt `<|start|>assistant`:

    <|channel|>analysis<|message|>…reasoning…<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>…answer…<|return|>

A message's header runs to `<|message|>` (its channel after `<|channel|>`, a recipient after
`to=`, which may also come before the channel), its body to `<|end|>`, `<|call|>` or `<|return|>`
(or the end of the output). The `analysis` channel is reasoning; `final` (and `commentary`
without a recipient: a preamble the model shows the user) is content; a message to
`functions.NAME` is a tool call whose body is its JSON arguments. With reasoning parsing off the
analysis text is content; with tool parsing off a call's body is content. Output that is not
harmony at all (no header within HEADER_LIMIT characters) is content as it is.

The markers are special tokens: the stream keeps them while decoding (`HARMONY_MARKERS`).
"""

from __future__ import annotations

import json
import re

from services.styler.parsers.base import ParsedText, ToolCall, longest_marker_prefix_suffix, openai_call_id

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
HARMONY_MARKERS = (START, END, MESSAGE, CHANNEL, CALL, RETURN, CONSTRAIN)
_BODY_ENDS = (END, CALL, RETURN)
# A header longer than this (or this long before any `<|channel|>`) is not one: plain text
HEADER_LIMIT = 256
CHANNEL_WITHIN = 64
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class HarmonyParser:
    """Splits one choice's harmony output into content, reasoning and tool calls."""

    def __init__(self, name: str, reasoning: bool, tools: bool) -> None:
        self.name = name
        self._reasoning = reasoning
        self._tools = tools
        self._state = "header"  # "header" -> "body" -> "between" -> "header" ...; or "plain"
        self._buf = ""
        self._kind = "content"  # the current body's destination: content | reasoning | call
        self._call_name = ""

    def feed(self, text: str) -> ParsedText:
        self._buf += text
        out = ParsedText()
        self._scan(out, final=False)
        return out

    def finish(self) -> ParsedText:
        out = ParsedText()
        self._scan(out, final=True)
        return out

    def _scan(self, out: ParsedText, final: bool) -> None:
        while True:
            if self._state == "plain":
                out.content += self._buf
                self._buf = ""
                return
            if self._state == "between":  # after a body: the next message's `<|start|>`, if any
                head = self._buf.lstrip()
                if head.startswith(START):
                    self._buf, self._state = head[len(START) :], "header"
                    continue
                if not head or (not final and START.startswith(head)):
                    self._buf = head
                    return
                self._state = "header"  # a header without `<|start|>` (a model's slip)
            if self._state == "header":
                i = self._buf.find(MESSAGE)
                if i < 0:
                    no_channel = CHANNEL not in self._buf and len(self._buf) > CHANNEL_WITHIN
                    if len(self._buf) > HEADER_LIMIT or no_channel or (final and self._buf.strip()):
                        self._state = "plain"
                        continue
                    return
                self._open(self._buf[:i])
                self._buf, self._state = self._buf[i + len(MESSAGE) :], "body"
            if self._state == "body":
                ends = [(j, m) for m in _BODY_ENDS if (j := self._buf.find(m)) >= 0]
                if ends:
                    j, marker = min(ends)
                    self._emit(out, self._buf[:j], closed=True)
                    self._buf, self._state = self._buf[j + len(marker) :], "between"
                    continue
                if final:
                    self._emit(out, self._buf, closed=True)
                    self._buf = ""
                    return
                if self._kind == "call":
                    return  # a call's arguments are sent whole
                hold = longest_marker_prefix_suffix(self._buf, _BODY_ENDS)
                self._emit(out, self._buf[: len(self._buf) - hold], closed=False)
                self._buf = self._buf[len(self._buf) - hold :]
                return

    def _open(self, header: str) -> None:
        """Where the body after `header` goes."""
        channel_match, recipient_match = _CHANNEL.search(header), _RECIPIENT.search(header)
        channel = channel_match.group(1) if channel_match else ""
        recipient = recipient_match.group(1) if recipient_match else ""
        if recipient.startswith("functions.") and self._tools:
            self._kind, self._call_name = "call", recipient.removeprefix("functions.")
        elif channel == "analysis" and self._reasoning:
            self._kind = "reasoning"
        else:
            self._kind = "content"

    def _emit(self, out: ParsedText, text: str, closed: bool) -> None:
        if self._kind == "reasoning":
            out.reasoning += text
        elif self._kind == "content":
            out.content += text
        elif closed:
            arguments = _arguments(text)
            if arguments is None or not self._call_name:
                out.content += text  # malformed: shown, as other formats' parsers do
            else:
                out.tool_calls.append(ToolCall(openai_call_id(), self._call_name, arguments))


def _arguments(body: str) -> str | None:
    """A call's body as JSON object text (None if it is not one)."""
    try:
        value = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
