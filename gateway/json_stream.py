"""Incremental JSON: text arriving in pieces -> tokens, and tokens -> `json.dumps` text.

The lexer never waits for a whole value: strings come out as decoded pieces as soon as their
characters are complete (an escape or a surrogate pair split across two pieces is held back), so
a streamed tool call's arguments move as they are generated. Numbers and literals come out whole,
once the character after them is seen.

`canonical(token)` re-serialises a token the way `json.dumps(value, ensure_ascii=False)` writes
the parsed value (", " and ": " separators, no other whitespace, minimal escapes, numbers
normalised), so the concatenation of the pieces of a value equals `json.dumps(json.loads(text))`
however the text was split: streamed and non-streamed tool-call arguments are the same string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_WHITESPACE = " \t\n\r"
_PUNCTUATION = "{}[],:"
_SCALAR_START = "-0123456789tfn"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass(frozen=True)
class Token:
    kind: str  # "punct" | "string_start" | "string_piece" | "string_end" | "scalar"
    text: str = ""  # punct: the character; string_piece: decoded text; scalar: its JSON text


class JsonLexer:
    """Feed JSON text in any pieces; get the tokens completed so far. Raises ValueError on text
    that cannot be JSON (the structure itself is the caller's to check)."""

    def __init__(self) -> None:
        self._state = "out"  # "out" | "string" | "escape" | "unicode" | "scalar"
        self._buf = ""  # scalar text, or the hex digits of a \\u escape
        self._high: str | None = None  # a high surrogate waiting for its low half
        self._piece: list[str] = []  # decoded string text not yet emitted

    def feed(self, text: str) -> list[Token]:
        out: list[Token] = []
        for ch in text:
            self._char(ch, out)
        if self._piece:
            out.append(Token("string_piece", "".join(self._piece)))
            self._piece = []
        return out

    def finish(self) -> list[Token]:
        """The end of the text: a pending top-level number or literal is complete now."""
        out: list[Token] = []
        if self._state == "scalar":
            out.append(self._scalar())
            self._state = "out"
        return out

    def _scalar(self) -> Token:
        try:
            value = json.loads(self._buf)
        except ValueError:
            raise ValueError(f"not a JSON number or literal: {self._buf!r}") from None
        if isinstance(value, str):
            raise ValueError(f"not a JSON number or literal: {self._buf!r}")
        return Token("scalar", self._buf)

    def _decoded(self, ch: str) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            if "\udc00" <= ch <= "\udfff":
                self._piece.append((high + ch).encode("utf-16", "surrogatepass").decode("utf-16"))
                return
            self._piece.append(high)  # a lone high surrogate, kept as json.loads keeps it
        if "\ud800" <= ch <= "\udbff":
            self._high = ch
        else:
            self._piece.append(ch)

    def _char(self, ch: str, out: list[Token]) -> None:
        state = self._state
        if state == "string":
            if ch == '"':
                if self._high is not None:
                    self._piece.append(self._high)
                    self._high = None
                if self._piece:
                    out.append(Token("string_piece", "".join(self._piece)))
                    self._piece = []
                out.append(Token("string_end"))
                self._state = "out"
            elif ch == "\\":
                self._state = "escape"
            elif ch < " ":
                raise ValueError("a control character inside a JSON string")
            else:
                self._decoded(ch)
        elif state == "escape":
            if ch == "u":
                self._state, self._buf = "unicode", ""
            elif ch in _ESCAPES:
                self._decoded(_ESCAPES[ch])
                self._state = "string"
            else:
                raise ValueError(f"invalid escape \\{ch} in a JSON string")
        elif state == "unicode":
            if ch not in "0123456789abcdefABCDEF":
                raise ValueError("invalid \\u escape in a JSON string")
            self._buf += ch
            if len(self._buf) == 4:
                self._decoded(chr(int(self._buf, 16)))
                self._state = "string"
        elif state == "scalar" and ch not in _WHITESPACE and ch not in _PUNCTUATION:
            self._buf += ch
        else:
            if state == "scalar":
                out.append(self._scalar())
                self._state = "out"
            if ch in _WHITESPACE:
                return
            if ch in _PUNCTUATION:
                out.append(Token("punct", ch))
            elif ch == '"':
                out.append(Token("string_start"))
                self._state = "string"
            elif ch in _SCALAR_START:
                self._state, self._buf = "scalar", ch
            else:
                raise ValueError(f"unexpected character {ch!r} in JSON")


def _escape_surrogates(text: str) -> str:
    # json.dumps(ensure_ascii=False) leaves a lone surrogate raw, which cannot be sent as UTF-8.
    return "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text)


def canonical(token: Token) -> str:
    """The token as `json.dumps(..., ensure_ascii=False)` writes it."""
    if token.kind == "punct":
        return {",": ", ", ":": ": "}.get(token.text, token.text)
    if token.kind in ("string_start", "string_end"):
        return '"'
    if token.kind == "string_piece":
        return _escape_surrogates(json.dumps(token.text, ensure_ascii=False)[1:-1])
    return json.dumps(json.loads(token.text))
