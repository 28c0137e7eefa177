"""Typed views of what the gateway sends to and gets from the styler and the workers.

`clients.py` converts these to and from protobuf; nothing else in the gateway sees `*_pb2`.
A worker request's sampling parameters are `services/common/sampling.py`'s `SamplingParams[Guided]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Guided:
    """A structured-output constraint (the worker's `GuidedDecoding`), and where the request put it.

    `kind` names the proto oneof field: "json_schema" (value: JSON text), "json_object", "regex"
    (value: the pattern), "choice" (choices), "lark_grammar" (value: the grammar).
    """

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    param: str = ""  # the request field it came from: a worker's complaint about it names this field


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    rank: int = 0  # of token_id among all tokens (1: the most likely); 0: not known


@dataclass(frozen=True)
class ChoiceDelta:
    """New tokens of one choice from one worker chunk."""

    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]  # parallel to token_ids when asked, else empty
    finish_reason: str | None  # "stop" | "length" | "abort" | None (still running)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """One chunk of a worker's Generate stream."""

    choices: tuple[ChoiceDelta, ...]
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # first chunk only, when asked
    usage: Usage | None = None  # last chunk only


@dataclass(frozen=True)
class WorkerInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    version: str
    # what makes two workers able to exchange KV (disaggregation pairs only equal fingerprints)
    role: str = "unified"  # "unified" | "prefill" | "decode" | "encode"
    architecture: str = ""
    dtype: str = ""
    block_size: int = 0
    kv_dtype: str = ""  # the KV cache's element type ("bfloat16", "float8_e4m3fn" under fp8, ...)
    kv_layout: str = ""  # the model's "layers x kv_heads x head_dim, block_size, layout name"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_heads_per_rank: int = 0  # KV heads each tensor-parallel rank holds
    fingerprint: str = ""
    kv_events: bool = False  # SubscribeKvEvents streams its prefix-cache changes (exact routing)
    kv_layerwise: bool = False  # serves PrefillStream / takes layer-wise handles (layer-wise push)
    task: str = "generate"  # "generate" | "embed" (--task): which requests it serves
    hidden_size: int = 0  # an embed worker's embedding length
    # images whose embeddings it keeps by content hash (0: send image pixels always)
    encoder_cache_size: int = 0

    @property
    def parallel_layout(self) -> str:
        """E.g. "T=2 x P=1, 1 KV head per rank" (for the log when a pair's layouts differ)."""
        heads = self.kv_heads_per_rank
        return (
            f"T={self.tensor_parallel_size} x P={self.pipeline_parallel_size}, "
            f"{heads} KV head{'s' if heads != 1 else ''} per rank"
        )


@dataclass(frozen=True)
class CacheEvent:
    """One change of a worker's prefix cache (SubscribeKvEvents)."""

    sequence: int
    kind: str  # "stored" | "evicted" | "snapshot"
    block_hashes: tuple[int, ...]
    block_size: int
    epoch: str


@dataclass(frozen=True)
class KVSource:
    """A prefill worker's KV handle, passed on to a decode worker's Generate."""

    handle_id: str
    address: str
    num_tokens: int
    expires_at_ms: int
    fingerprint: str
    # layer-wise push: issued at admission; the decode worker streams the first token itself
    layerwise: bool = False


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill worker returns: the first token and where the prompt's KV waits."""

    first: ChoiceDelta
    stop_token_id: int | None
    handle: KVSource | None  # None when the first token already ended the choice
    prompt_logprobs: tuple[TokenLogprob, ...]
    usage: Usage


@dataclass(frozen=True)
class WorkerLoad:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int


@dataclass(frozen=True)
class StylerInfo:
    model_name: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    max_model_len: int
    tool_parser: str
    reasoning_parser: str
    max_token_bytes: int = 0  # most prompt-text bytes one token stands for (0 = no bound)


@dataclass(frozen=True)
class ToolGrammarRequest:
    """Ask the styler for the strict tool-call grammar of a chat request (gateway/strict_tools.py)."""

    parallel: bool  # several calls in one reply
    answer_schema: str = ""  # JSON schema text the reply matches when it is not calls ("" = free text)


@dataclass(frozen=True)
class Rendered:
    """A chat conversation rendered by the template."""

    prompt: str
    token_ids: tuple[int, ...]
    images: tuple[Any, ...] = ()  # common_pb2.ImageInput of an image-in model, passed to the worker
    tool_grammar: str = ""  # the strict tool-call grammar (Lark) when asked and the model has a format


@dataclass(frozen=True)
class DetokenizeStart:
    """What the styler's DetokenizeStream needs to know about a request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    stop: tuple[str, ...]
    include_stop_str_in_output: bool
    tool_parser: str  # "" = off, "auto" = the model's parser
    reasoning_parser: str  # "" = off, "auto" = the model's parser
    num_choices: int
    first_choice_index: int
    prompt_opens_reasoning: bool


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class TextDelta:
    """Text the styler produced for one choice."""

    index: int
    text: str
    reasoning_text: str
    tool_calls: tuple[ToolCallDelta, ...]
    stopped: bool  # a stop string matched: the choice is over
    finished: bool  # the choice's text is complete
    num_tokens: int  # token ids of the choice consumed so far
    matched_stop: str = ""  # the stop string that matched (with `stopped`)


@dataclass(frozen=True)
class TokenText:
    """A single token's own text and bytes (for logprobs)."""

    text: str
    raw: bytes = field(default=b"")


@dataclass(frozen=True)
class EmbeddingResult:
    """One input's embedding from a worker's Embed (L2-normalised, hidden_size float32 values)."""

    values: tuple[float, ...]
    prompt_tokens: int
    cached_prompt_tokens: int
