"""The reasoning markers and the one rule for "does this prompt leave a thought open?".

Shared by the styler (which parses reasoning out of the output) and the gateway (which tells the
styler when the rendered prompt already opened a thought), so both decide the same way.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether the prompt leaves a thought open: its last `<think>` comes after its last `</think>`."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
