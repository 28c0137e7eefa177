"""`Styler`: the in-process API of the styler service (what `rpc.py` serves over gRPC).

styler = Styler.load(StylerOptions(model="../shared/tokenizers/qwen3"))
ids = styler.tokenize("hello")
prompt = styler.render(RenderInput(messages=[{"role": "user", "content": "hi"}]))
stream = styler.open_stream(StreamOptions(stop=("\\n\\n",)))   # one per request
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.styler.tokenizer import Tokenizer


@dataclass(frozen=True)
class StylerOptions:
    """What `Styler.load` needs (the service's config minus the gRPC options)."""

    model: str
    model_name: str = ""  # default: the directory's name
    tool_parser: str = "auto"  # "auto" | "none" | a parser name
    reasoning_parser: str = "auto"  # "auto" | "none" | a parser name
    chat_template: str = ""  # a template file replacing the model's
    render_timeout_s: float = 10.0
    max_prompt_chars: int = 4_000_000


@dataclass(frozen=True)
class StylerInfo:
    """Static facts about the tokenizer and template (the Info rpc)."""

    model_name: str
    vocab_size: int
    bos_token: str
    eos_token: str
    eos_token_ids: tuple[int, ...]
    special_tokens: tuple[str, ...]
    has_chat_template: bool
    max_model_len: int
    tool_parser: str
    reasoning_parser: str


class Styler:
    """Tokenizer, chat template, parsers of one model; thread-safe, stateless across requests."""

    def __init__(self, options: StylerOptions, tokenizer: Tokenizer) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.model_name = options.model_name or Path(options.model).resolve().name

    @classmethod
    def load(cls, options: StylerOptions) -> Styler:
        return cls(options, Tokenizer.from_dir(options.model))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.tokenizer.check_ids(token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        self.tokenizer.check_ids(token_ids)
        return [self.tokenizer.token_bytes(t) for t in token_ids]

    def info(self) -> StylerInfo:
        tok = self.tokenizer.info()
        return StylerInfo(
            model_name=self.model_name,
            vocab_size=tok.vocab_size,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            eos_token_ids=tok.eos_token_ids,
            special_tokens=tok.special_tokens,
            has_chat_template=self.tokenizer.files.default_chat_template() is not None,
            max_model_len=tok.max_model_len,
            tool_parser="",
            reasoning_parser="",
        )
