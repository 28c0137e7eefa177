"""Validated requests, as the execution path sees them (after `validation.py`).

The HTTP routes and the gRPC Inference service both build these through `validation.py`, so
both front ends share one set of OpenAI semantics and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.downstream import Guided
from gateway.tool_schema import ForcedToolChoice
from services.common.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationParams:
    """Options common to chat and completions (OpenAI fields plus vLLM's extensions)."""

    # validated (services/common/sampling.py); max_tokens None: up to the context length; guided:
    # structured output (response_format, guided_*, a forced tool choice)
    sampling: SamplingParams[Guided]
    stop: tuple[str, ...]
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    stream: bool
    include_usage: bool
    user: str
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk


@dataclass(frozen=True)
class ChatRequest:
    model: str  # "" = the served model
    messages: tuple[dict[str, Any], ...]
    params: GenerationParams
    tools: list[dict[str, Any]] | None
    tool_choice: str  # "none" | "auto" | "required" | "named"
    parallel_tool_calls: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    add_generation_prompt: bool
    continue_final_message: bool
    documents: list[Any] | None
    forced_tool: ForcedToolChoice | None = None  # tool_choice "required" or named: the output is calls


# A completion prompt: text, or token ids.
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]  # one generation (with n choices) per prompt
    params: GenerationParams
    echo: bool
    add_special_tokens: bool


@dataclass(frozen=True)
class TokenizeRequest:
    model: str
    prompt: str | None  # either prompt ...
    messages: tuple[dict[str, Any], ...] | None  # ... or chat messages
    tools: list[dict[str, Any]] | None
    add_generation_prompt: bool
    continue_final_message: bool
    add_special_tokens: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    return_token_strs: bool


@dataclass(frozen=True)
class DetokenizeRequest:
    model: str
    tokens: tuple[int, ...]
