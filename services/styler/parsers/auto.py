"""Which parsers a model uses: `--tool-parser` / `--reasoning-parser` "auto" rules.

Tool calls, first rule that holds (looking at the vocabulary and the chat template text):
0. `<|channel|>` is a token or in the template (gpt-oss) -> `harmony`
1. `<｜tool▁calls▁begin｜>` is a token or in the template -> `deepseek_v3`
2. `[TOOL_CALLS]` is a token or in the template -> `mistral`
3. `<tool_call>` is a token or in the template -> `hermes`
4. `<|python_tag|>` is a token or in the template -> `llama3_json`
5. otherwise none.

Reasoning:
0. `<|channel|>` is a token or in the template (gpt-oss) -> `harmony`
1. the template writes `<｜Assistant｜>` and `<think>` (DeepSeek-R1 family) -> `deepseek_r1`
2. `<think>` and `</think>` are tokens, or the template mentions `</think>` -> `qwen3`
3. otherwise none.
"""

from __future__ import annotations

from collections.abc import Callable

from services.styler.parsers.reasoning import REASONING_PARSERS
from services.styler.parsers.tool_formats import TOOL_PARSERS


def detect_tool_parser(has_token: Callable[[str], bool], template: str) -> str:
    def present(marker: str) -> bool:
        return has_token(marker) or marker in template

    for marker, name in (
        ("<|channel|>", "harmony"),
        ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
        ("[TOOL_CALLS]", "mistral"),
        ("<tool_call>", "hermes"),
        ("<|python_tag|>", "llama3_json"),
    ):
        if present(marker):
            return name
    return ""


def detect_reasoning_parser(has_token: Callable[[str], bool], template: str) -> str:
    if has_token("<|channel|>") or "<|channel|>" in template:
        return "harmony"
    if "<｜Assistant｜>" in template and "<think>" in template:
        return "deepseek_r1"
    if (has_token("<think>") and has_token("</think>")) or "</think>" in template:
        return "qwen3"
    return ""


def resolve_parser(option: str, detected: str, known: tuple[str, ...] | list[str], what: str) -> str:
    """The parser name for an option: "auto" -> detected, "none"/"" -> "", else a known name."""
    if option == "auto":
        return detected
    if option in ("", "none"):
        return ""
    if option not in known:
        raise ValueError(f"unknown {what} {option!r} (known: auto, none, {', '.join(known)})")
    return option


TOOL_PARSER_NAMES = tuple(TOOL_PARSERS)
REASONING_PARSER_NAMES = REASONING_PARSERS
