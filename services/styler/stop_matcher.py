"""Stop strings over a stream of text that arrives in arbitrary pieces.

The first stop string to complete (earliest end; on a tie, the earliest start) ends the text,
wherever the token boundaries fall. Text that could be the beginning of a stop string is held
back until it is known not to be one, so nothing after a stop is ever released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.styler.parsers.base import longest_marker_prefix_suffix


@dataclass(frozen=True)
class StopResult:
    text: str  # text released by this step
    matched: str | None  # the stop string that matched, or None


class StopMatcher:
    """Finds stop strings in one choice's text."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop_str_in_output
        self._buf = ""

    @property
    def active(self) -> bool:
        """Whether there are stop strings to look for."""
        return bool(self._stop)

    def feed(self, text: str) -> StopResult:
        if not self._stop:
            return StopResult(text, None)
        # The held-back text holds no complete match, so searching all of it is cheap and exact.
        self._buf += text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stop:
            i = self._buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            out = self._buf[: end if self._include else start]
            self._buf = ""
            return StopResult(out, s)
        hold = longest_marker_prefix_suffix(self._buf, self._stop)
        out, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
        return StopResult(out, None)

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out
