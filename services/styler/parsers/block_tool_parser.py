"""Tool calls written as delimited blocks: `START body END`, any number of them, text around.

Text outside blocks is content; a block whose body parses becomes tool calls the moment its
END arrives; a block that does not parse is given back as content, markers included. Text that
might be the start of a marker is held back. Whitespace between or after calls is dropped.
Used by the Hermes / Qwen (`<tool_call>`) and DeepSeek-V3 (`<｜tool▁call▁begin｜>`) formats.
"""

from __future__ import annotations

from collections.abc import Callable

from services.styler.parsers.base import ParsedText, ToolCall, longest_marker_prefix_suffix, openai_call_id

# One parsed call: (function name, arguments JSON text).
CallSpec = tuple[str, str]


class BlockToolParser:
    """Incremental parser of `start ... end` blocks; `silent` markers are dropped from the text."""

    def __init__(
        self,
        name: str,
        start: str,
        end: str,
        parse_block: Callable[[str], list[CallSpec] | None],
        silent: tuple[str, ...] = (),
        make_id: Callable[[], str] = openai_call_id,
    ) -> None:
        self.name = name
        self._start, self._end, self._silent = start, end, silent
        self._markers = (start, *silent)
        self._parse_block = parse_block
        self._make_id = make_id
        self._buf = ""
        self._inside = False
        self._after_call = False  # whitespace right after a call is not content
        self._pending_ws = ""

    def feed(self, text: str) -> ParsedText:
        self._buf += text
        out = ParsedText()
        self._scan(out, final=False)
        return out

    def finish(self) -> ParsedText:
        out = ParsedText()
        self._scan(out, final=True)
        self._pending_ws = ""
        return out

    def _scan(self, out: ParsedText, final: bool) -> None:
        while True:
            if self._inside:
                j = self._buf.find(self._end)
                if j < 0:
                    if final:  # never closed: accept it if the body is complete anyway
                        self._close_block(out, self._buf, closed=False)
                        self._buf = ""
                    return
                body, self._buf = self._buf[:j], self._buf[j + len(self._end) :]
                self._close_block(out, body, closed=True)
                continue
            found = [(i, m) for m in self._markers if (i := self._buf.find(m)) >= 0]
            if found:
                i, marker = min(found)
                self._content(out, self._buf[:i])
                self._buf = self._buf[i + len(marker) :]
                if marker == self._start:
                    self._inside = True
                    self._pending_ws = ""
                else:
                    self._after_call = True
                continue
            hold = 0 if final else longest_marker_prefix_suffix(self._buf, self._markers)
            self._content(out, self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold :]
            return

    def _close_block(self, out: ParsedText, body: str, closed: bool) -> None:
        self._inside = False
        calls = self._parse_block(body)
        if calls is None:
            self._content(out, self._start + body + (self._end if closed else ""))
            return
        out.tool_calls.extend(ToolCall(id=self._make_id(), name=n, arguments=a) for n, a in calls)
        self._after_call = True
        self._pending_ws = ""

    def _content(self, out: ParsedText, text: str) -> None:
        if not text:
            return
        if self._after_call:
            if not text.strip():
                self._pending_ws += text
                return
            text, self._pending_ws, self._after_call = self._pending_ws + text, "", False
        out.content += text
