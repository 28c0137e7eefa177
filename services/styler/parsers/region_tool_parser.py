"""Tool calls that take the rest of the message once a marker appears: everything from the
marker on is held and parsed when the choice finishes; if it does not parse, it is content.

Used by Mistral (`[TOOL_CALLS]` anywhere) and Llama-3 JSON (a message that starts with `{` or
`<|python_tag|>`).
"""

from __future__ import annotations

from collections.abc import Callable

from services.styler.parsers.base import ParsedText, ToolCall, longest_marker_prefix_suffix, openai_call_id
from services.styler.parsers.block_tool_parser import CallSpec


class RegionToolParser:
    """Incremental parser of a trailing tool-call region; `at_start_only` for whole-message calls."""

    def __init__(
        self,
        name: str,
        markers: tuple[str, ...],
        parse_region: Callable[[str], list[CallSpec] | None],
        at_start_only: bool = False,
        make_id: Callable[[], str] = openai_call_id,
    ) -> None:
        self.name = name
        self._markers = markers
        self._parse_region = parse_region
        self._at_start_only = at_start_only
        self._make_id = make_id
        self._buf = ""
        self._region: str | None = None  # raw text from the marker on, once seen
        self._decided_content = False  # at_start_only: the message is plain content

    def feed(self, text: str) -> ParsedText:
        if self._region is not None:
            self._region += text
            return ParsedText()
        if self._decided_content:
            return ParsedText(content=text)
        self._buf += text
        if self._at_start_only:
            head = self._buf.lstrip()
            if any(head.startswith(m) for m in self._markers):
                self._region, self._buf = self._buf, ""
                return ParsedText()
            if not head or any(m.startswith(head) for m in self._markers):
                return ParsedText()  # still undecided
            self._decided_content = True
            out, self._buf = self._buf, ""
            return ParsedText(content=out)
        found = [i for m in self._markers if (i := self._buf.find(m)) >= 0]
        if found:
            i = min(found)
            out, self._region, self._buf = self._buf[:i], self._buf[i:], ""
            return ParsedText(content=out)
        hold = longest_marker_prefix_suffix(self._buf, self._markers)
        out, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
        return ParsedText(content=out)

    def finish(self) -> ParsedText:
        if self._region is None:
            out, self._buf = self._buf, ""
            return ParsedText(content=out)
        region, self._region = self._region, None
        calls = self._parse_region(region)
        if not calls:
            return ParsedText(content=region)
        return ParsedText(tool_calls=[ToolCall(id=self._make_id(), name=n, arguments=a) for n, a in calls])
