"""`Styler`: the in-process API of the styler service (what `rpc.py` serves over gRPC).

styler = Styler.load(StylerOptions(model="../shared/tokenizers/qwen3"))
ids = styler.tokenize("hello")
prompt = styler.render(RenderInput(messages=[{"role": "user", "content": "hi"}]))
stream = styler.open_stream(StreamOptions(stop=("\\n\\n",)))   # one per request
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from services.styler.chat_template import ChatTemplateRenderer, RenderInput
from services.styler.images import ImageError, PixelValues
from services.styler.messages import check_text
from services.styler.multimodal import ImageSupport, PromptImage, has_images
from services.styler.parsers.auto import (
    REASONING_PARSER_NAMES,
    TOOL_PARSER_NAMES,
    detect_reasoning_parser,
    detect_tool_parser,
    resolve_parser,
)
from services.styler.parsers.tool_grammar import STRICT_TOOL_FAMILIES, ToolGrammarSpec, compile_tool_grammar
from services.styler.render_pool import RenderLimits, RenderPool
from services.styler.stream import DetokenizeSession, StreamOptions
from services.styler.tokenizer import Tokenizer

__all__ = ["RenderInput", "RenderedPrompt", "StreamOptions", "Styler", "StylerInfo", "StylerOptions"]


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
    render_memory_mb: int = 1024  # address-space limit of each render process
    render_processes: int = 2


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
    max_token_bytes: int = 0  # most input-text bytes per token (0 = no bound)


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered conversation."""

    prompt: str
    token_ids: list[int]  # [num_prompt_tokens], tokenized without extra special tokens
    images: tuple[PromptImage, ...] = ()  # image-in models: pixels and placeholder spans


class Styler:
    """Tokenizer, chat template, parsers of one model; thread-safe, stateless across requests."""

    def __init__(self, options: StylerOptions, tokenizer: Tokenizer) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.model_name = options.model_name or Path(options.model).resolve().name
        files = tokenizer.files
        if options.chat_template:
            try:
                template: str | None = Path(options.chat_template).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"--chat-template: cannot read {options.chat_template}: {exc}") from exc
        else:
            template = files.default_chat_template()
        self.chat_template = template
        self.render_pool = RenderPool(
            RenderLimits(
                timeout_s=options.render_timeout_s,
                max_output_chars=options.max_prompt_chars,
                memory_mb=options.render_memory_mb,
                num_processes=options.render_processes,
            )
        )
        self.images = ImageSupport.from_model_dir(options.model, tokenizer)  # None: text only
        self.renderer = ChatTemplateRenderer(template, tokenizer.special_tokens_map, self.render_pool)
        detect_text = "\n".join([*(files.chat_templates.values()), template or ""])
        self.tool_parser = resolve_parser(
            options.tool_parser,
            detect_tool_parser(tokenizer.has_token, detect_text),
            TOOL_PARSER_NAMES,
            "--tool-parser",
        )
        self.reasoning_parser = resolve_parser(
            options.reasoning_parser,
            detect_reasoning_parser(tokenizer.has_token, detect_text),
            REASONING_PARSER_NAMES,
            "--reasoning-parser",
        )

    @classmethod
    def load(cls, options: StylerOptions) -> Styler:
        return cls(options, Tokenizer.from_dir(options.model))

    def render(self, request: RenderInput) -> RenderedPrompt:
        """`apply_chat_template(..., tokenize=True)`; ValueError with the template's message."""
        named = self.tokenizer.files.chat_templates
        if request.chat_template is not None and request.chat_template in named:
            # As in transformers, `chat_template` may name one of the model's templates.
            request = replace(request, chat_template=named[request.chat_template])
        elif (
            request.chat_template is None
            and request.tools is not None
            and not self.options.chat_template
            and "tool_use" in named
        ):
            request = replace(request, chat_template=named["tool_use"])
        pixels: list[PixelValues] = []
        if has_images(request.messages):
            if self.images is None:
                raise ImageError(f"messages: {self.model_name} takes no images")
            messages, pixels = self.images.prepare(request.messages)
            request = replace(request, messages=messages)
        prompt = self.renderer.render(request)
        # Surrogates reach a prompt only through JSON-escaped input; the tokenizer takes UTF-8 text.
        check_text(prompt, "messages")
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.images is None:
            return RenderedPrompt(prompt, token_ids)
        token_ids, images = self.images.expand(token_ids, pixels)
        return RenderedPrompt(prompt, token_ids, tuple(images))

    def tool_grammar(self, spec: ToolGrammarSpec) -> str:
        """The strict tool-call grammar of this model's tool-call format ("" when it has none or
        one without a grammar); ValueError naming the field when the tools cannot be expressed."""
        if self.tool_parser not in STRICT_TOOL_FAMILIES:
            return ""
        return compile_tool_grammar(self.tool_parser, spec, self.tokenizer.added_token_id)

    def open_stream(self, options: StreamOptions) -> DetokenizeSession:
        """State for one DetokenizeStream; "auto" parser names resolve to the model's parsers."""
        check_text(options.stop, "start.stop")
        tool = resolve_parser(options.tool_parser, self.tool_parser, TOOL_PARSER_NAMES, "start.tool_parser")
        reasoning = resolve_parser(
            options.reasoning_parser, self.reasoning_parser, REASONING_PARSER_NAMES, "start.reasoning_parser"
        )
        return DetokenizeSession(self.tokenizer, options, tool, reasoning)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text, "text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.tokenizer.check_ids(token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        self.tokenizer.check_ids(token_ids)
        return [self.tokenizer.token_bytes(t) for t in token_ids]

    def close(self) -> None:
        """Stop the render processes."""
        self.render_pool.close()

    def info(self) -> StylerInfo:
        tok = self.tokenizer.info()
        return StylerInfo(
            model_name=self.model_name,
            vocab_size=tok.vocab_size,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            eos_token_ids=tok.eos_token_ids,
            special_tokens=tok.special_tokens,
            has_chat_template=self.chat_template is not None,
            max_model_len=tok.max_model_len,
            tool_parser=self.tool_parser,
            reasoning_parser=self.reasoning_parser,
            max_token_bytes=tok.max_token_bytes,
        )
