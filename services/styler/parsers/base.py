"""What every parser produces: content text, reasoning text and complete tool calls."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ToolCall:
    """A complete function call parsed from model output (OpenAI `tool_calls[]`)."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedText:
    """What a parser produced from some text: visible content plus completed tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def extend(self, other: ParsedText) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


class ToolParser(Protocol):
    """Incremental tool-call parser of one choice: `feed` text as it arrives, then `finish` once.

    Text that may still turn out to be (part of) a tool call is held back; the result of feeding
    a text in any chunking is the same as feeding it whole."""

    name: str

    def feed(self, text: str) -> ParsedText: ...

    def finish(self) -> ParsedText: ...


def openai_call_id() -> str:
    """An OpenAI-style tool-call id: "call_" + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral templates refuse ids that are not exactly 9 alphanumeric characters."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def longest_marker_prefix_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
