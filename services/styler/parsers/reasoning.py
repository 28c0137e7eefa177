"""Reasoning in `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1), parsed incrementally.

`qwen3`: the output is reasoning only when it opens with `<think>` (or the prompt already
opened it: the prompt has a `<think>` after its last `</think>`, as a generation prompt that
opens the thought or a continued thought `<think>\nLet me think` has); otherwise it is all content (e.g. `enable_thinking=False`).
`deepseek_r1`: the output starts inside the reasoning (R1 templates open `<think>` in the
generation prompt); a leading `<think>` is dropped. In both, `</think>` ends the reasoning;
whitespace right after `<think>` and after `</think>` is dropped; a reasoning block that never
closes stays reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.reasoning import THINK_END, THINK_START
from services.styler.parsers.base import ParsedText, longest_marker_prefix_suffix
from services.styler.parsers.harmony import HarmonyParser


def ids_open_reasoning(prompt_ids: Sequence[int], start_id: int, end_id: int) -> bool:
    """`prompt_opens_reasoning` on token ids, where `<think>` and `</think>` are single tokens."""
    return _last_index(prompt_ids, start_id) > _last_index(prompt_ids, end_id)


def _last_index(ids: Sequence[int], value: int) -> int:
    try:
        return len(ids) - 1 - list(reversed(ids)).index(value)
    except ValueError:
        return -1


class ThinkReasoningParser:
    """Splits one choice's text into reasoning and content."""

    def __init__(self, name: str, starts_in_reasoning: bool) -> None:
        self.name = name
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "start"  # "start" -> "reasoning" -> "content", or "start" -> "content"
        self._buf = ""
        self._strip_leading = False  # drop whitespace at the start of the current part

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
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._buf = head[len(THINK_START) :]
                self._state, self._strip_leading = "reasoning", True
            elif not final and (not head or THINK_START.startswith(head)):
                return  # might still be "<think>"
            elif self._starts_in_reasoning:
                self._state = "reasoning"
            else:
                self._state = "content"
        if self._state == "reasoning":
            i = self._buf.find(THINK_END)
            if i >= 0:
                self._emit(out, "reasoning", self._buf[:i])
                self._buf = self._buf[i + len(THINK_END) :]
                self._state, self._strip_leading = "content", True
            else:
                hold = 0 if final else longest_marker_prefix_suffix(self._buf, (THINK_END,))
                self._emit(out, "reasoning", self._buf[: len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold :]
                return
        if self._state == "content":
            self._emit(out, "content", self._buf)
            self._buf = ""

    def _emit(self, out: ParsedText, kind: str, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            if not text:
                return
            self._strip_leading = False
        if kind == "reasoning":
            out.reasoning += text
        else:
            out.content += text


REASONING_PARSERS = ("qwen3", "deepseek_r1", "harmony")


def make_reasoning_parser(name: str, prompt_opens_reasoning: bool) -> ThinkReasoningParser | HarmonyParser:
    """`harmony` (gpt-oss): the analysis channel is the reasoning (parsers/harmony.py)."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(REASONING_PARSERS)})")
    if name == "harmony":
        return HarmonyParser(name, reasoning=True, tools=False)
    return ThinkReasoningParser(name, starts_in_reasoning=prompt_opens_reasoning or name == "deepseek_r1")
