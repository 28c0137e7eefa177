"""Per-request limits (each a `tandem gateway` option); exceeding one is a 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import GatewayConfig


@dataclass(frozen=True)
class Limits:
    max_n: int = 16  # choices per request
    max_stop_strings: int = 16
    max_logprobs: int = 20  # top_logprobs (chat) / logprobs (completions)
    max_tools: int = 128
    max_tokens: int = 0  # largest max_tokens; 0 = up to the context length
    max_prompt_tokens: int = 0  # 0 = up to the context length
    max_sequences_per_request: int = 256  # prompts x n

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Limits:
        return cls(
            max_n=config.max_n,
            max_stop_strings=config.max_stop_strings,
            max_logprobs=config.max_logprobs,
            max_tools=config.max_tools,
            max_tokens=config.max_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
            max_sequences_per_request=config.max_sequences_per_request,
        )


DEFAULT_LIMITS = Limits()
