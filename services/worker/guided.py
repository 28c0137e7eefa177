"""Guided (structured-output) decoding: grammars compiled per tokenizer, one matcher per choice,
and the token mask applied to the logits.

    compiler = GrammarCompiler.load("model_dir", vocab_size, eos_token_ids)   # once per worker
    grammar = compiler.compile(GuidedSpec("regex", r"\\d+"))  # gRPC thread pool; LRU-cached
    state = grammar.new_state(stop_token_ids)                  # per choice, engine thread
    logits = apply_token_mask(logits, guided_rows(seqs))        # ModelRunner, guided rows only
    state.consume(token_id); compiler.refresh_masks(states)    # Scheduler.update, after sampling

llguidance does the parsing: a grammar (JSON schema, regex, choice list or Lark) becomes an
`LLMatcher` that tells, byte-exactly over the tokenizer's vocabulary, which next tokens keep the
output a prefix of the language. The compiled grammar is a template matcher that is never
advanced; every choice gets a `deep_copy` of it.

Each `GuidedState` keeps the mask of its *next* token, computed right after the previous token
was consumed (for a whole step at once, on llguidance's threads; at compile time for the first
token): that is when we learn whether the output is complete (nothing but an end token may
follow), so the scheduler finishes the choice with "stop" on the token that completed it instead
of sampling one more. End tokens: llguidance's EOS bits are cleared and the request's own stop
ids (EOS unless ignore_eos, plus stop_token_ids) are allowed exactly where the grammar accepts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import llguidance
import torch

from services.worker.errors import InvalidRequestError
from services.worker.grammar_check import GrammarChecker, grammar_text, llg_tokenizer

log = logging.getLogger(__name__)

GuidedKind = Literal["json_schema", "json_object", "regex", "choice", "lark_grammar"]
GUIDED_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "lark_grammar")

GRAMMAR_CACHE_SIZE = 128
# Threads computing the masks of one step's guided sequences: a mask over a large vocabulary is
# real CPU work per token; half the cores, at most 8, leaves the rest to the engine, gRPC and tokenizers.
MASK_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
MAX_ERROR_CHARS = 600


class GuidedUnavailableError(RuntimeError):
    """This worker cannot do guided decoding (no tokenizer); gRPC FAILED_PRECONDITION."""


@dataclass(frozen=True)
class GuidedSpec:
    """One constraint as the request gave it (the LRU key)."""

    kind: GuidedKind
    text: str  # the schema / regex / Lark text; a JSON list of strings for "choice"; "" for json_object

    @property
    def field(self) -> str:
        return f"sampling.guided.{self.kind}"


def choice_spec(values: Sequence[str]) -> GuidedSpec:
    return GuidedSpec("choice", json.dumps(list(values)))


def _short(message: str) -> str:
    """llguidance's parser errors append a state dump; keep the readable head."""
    message = message.split("\n<state>", 1)[0].strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


def _mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _tokenizer_file(path: Path) -> Path:
    return path / "tokenizer.json" if path.is_dir() else path


class CompiledGrammar:
    """A grammar compiled for one tokenizer: a template matcher in its initial state plus the
    first token's raw mask. Shared by every request with the same constraint (thread-safe)."""

    def __init__(self, compiler: GrammarCompiler, spec: GuidedSpec, template: llguidance.LLMatcher) -> None:
        self.compiler = compiler
        self.spec = spec
        self._template = template
        self._lock = threading.Lock()  # deep_copy from the engine thread and the compile pool
        # the first token's mask ([W] int32 words as bytes), EOS bits cleared
        self.first_mask = compiler.raw_mask(template)
        self.first_has_tokens = compiler.strip_end_tokens(self.first_mask)
        self.first_accepting = template.is_accepting()

    def matcher(self) -> llguidance.LLMatcher:
        with self._lock:
            return self._template.deep_copy()

    def new_state(self, stop_token_ids: Iterable[int]) -> GuidedState:
        """The state of one choice before its first token."""
        return GuidedState(self, self.matcher(), frozenset(stop_token_ids))


class GrammarCompiler:
    """The tokenizer and an LRU of compiled grammars (keyed by kind + text)."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        vocab_size: int,
        cache_size: int = GRAMMAR_CACHE_SIZE,
        checker: GrammarChecker | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # compiles each new constraint in a limited child process first (grammar_check.py)
        self.checker = checker
        self.vocab_size = vocab_size  # the logits' width: the mask covers exactly these ids
        self.num_words = _mask_words(vocab_size)
        # the ids llguidance allows where the grammar accepts (the model's EOS ids we gave it)
        self.eos_token_ids = tuple(t for t in tokenizer.eos_tokens if 0 <= t < vocab_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[GuidedSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        # computes a step's masks on several cores (llguidance's own thread pool, GIL released)
        self.executor = llguidance.LLExecutor(num_threads=MASK_THREADS)

    @classmethod
    def load(cls, path: str, vocab_size: int, eos_token_ids: Sequence[int]) -> GrammarCompiler:
        """From a tokenizer.json (or a directory holding one); GuidedUnavailableError says why not."""
        file = _tokenizer_file(Path(path))
        if not file.is_file():
            raise GuidedUnavailableError(f"no tokenizer.json at {file}")
        try:
            text = file.read_text()
            tokenizer = llg_tokenizer(text, vocab_size, list(eos_token_ids))
        except (ValueError, OSError) as exc:
            raise GuidedUnavailableError(f"{file}: {exc}") from None
        return cls(tokenizer, vocab_size, checker=GrammarChecker(text, vocab_size, list(eos_token_ids)))

    # ---- compile (gRPC thread pool) -----------------------------------------------------------
    def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache or built now (can take ~1 s for a huge
        schema: call it off the event loop and off the engine thread). Raises InvalidRequestError
        naming the field for a grammar llguidance refuses."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._build(spec)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, spec: GuidedSpec) -> CompiledGrammar:
        if self.checker is not None:  # a constraint that would crash or stall us fails there
            error = self.checker.check(spec.kind, spec.text)
            if error:
                raise InvalidRequestError(spec.field, _short(error))
        try:
            grammar = grammar_text(spec.kind, spec.text)
        except ValueError as exc:
            raise InvalidRequestError(spec.field, _short(str(exc))) from None
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(spec.field, _short(template.get_error()))
        compiled = CompiledGrammar(self, spec, template)
        if template.is_error():
            raise InvalidRequestError(spec.field, _short(template.get_error()))
        if template.is_stopped() or not compiled.first_has_tokens:
            what = "only the empty output" if compiled.first_accepting else "no output"
            raise InvalidRequestError(spec.field, f"the constraint allows {what}: nothing can be generated")
        return compiled

    # ---- masks -------------------------------------------------------------------------------
    def raw_mask(self, matcher: llguidance.LLMatcher) -> bytearray:
        """The matcher's next-token bitmask: bit t of 32-bit word t // 32 (little-endian)."""
        buf = bytearray(self.num_words * 4)
        target = torch.frombuffer(buf, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(target.data_ptr(), len(buf))
        return buf

    def refresh_masks(self, states: Sequence[GuidedState]) -> None:
        """Compute the next mask of every state whose mask is stale, all at once: one call into
        llguidance's executor (parallel over matchers), then the cheap per-state bit surgery.
        A state may turn `complete` (only an end token may follow) or `error` here."""
        stale = [s for s in states if s.needs_mask]
        if not stale:
            return
        size = self.num_words * 4
        buf = bytearray(size * len(stale))
        ptr = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        if len(stale) == 1:
            stale[0].matcher.unsafe_compute_mask_ptr(ptr, size)
        else:
            self.executor.unsafe_compute_mask_ptr(
                [(s.matcher, i) for i, s in enumerate(stale)], ptr, size, len(stale)
            )
        for i, state in enumerate(stale):
            matcher = state.matcher
            if matcher.is_error():
                state.error, state.needs_mask = _short(matcher.get_error()), False
                continue
            raw = buf[i * size : (i + 1) * size]
            self.strip_end_tokens(raw)
            state._set_mask(raw, matcher.is_accepting())

    def strip_end_tokens(self, raw: bytearray) -> bool:
        """Clear llguidance's EOS bits in `raw` (end tokens are the request's stop ids); return
        whether any other token is still allowed."""
        words = memoryview(raw).cast("I")
        for t in self.eos_token_ids:
            words[t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
        words.release()
        return raw.count(0) != len(raw)  # a C-level scan


class GuidedState:
    """One choice's matcher and the mask of its next token.

    `complete`: the output is a full sentence of the language and no token but an end token may
    follow (the choice finishes with "stop"). `error`: llguidance failed (a token it did not
    allow, or a resource limit); the request is failed with that message."""

    def __init__(
        self, grammar: CompiledGrammar, matcher: llguidance.LLMatcher, stop_ids: frozenset[int]
    ) -> None:
        self.grammar = grammar
        self.matcher = matcher
        self.stop_ids = tuple(sorted(t for t in stop_ids if 0 <= t < grammar.compiler.vocab_size))
        self.complete = False
        self.error: str | None = None
        self.mask = b""  # [W] int32 words: the allowed next tokens
        self.needs_mask = False  # a token was consumed since `mask` was computed
        self._set_mask(bytearray(grammar.first_mask), grammar.first_accepting)

    def fork(self) -> GuidedState:
        """A copy in the same state (a sibling choice before its first token)."""
        twin = GuidedState.__new__(GuidedState)
        twin.grammar, twin.stop_ids = self.grammar, self.stop_ids
        twin.matcher = self.matcher.deep_copy()
        twin.complete, twin.error, twin.mask = self.complete, self.error, self.mask
        twin.needs_mask = self.needs_mask
        return twin

    def consume(self, token_id: int) -> None:
        """Advance past a sampled (or resumed) token. Sets `complete` when nothing more may follow;
        otherwise the next mask is stale (`needs_mask`) until `GrammarCompiler.refresh_masks`."""
        if self.error is not None or self.complete:
            return
        matcher = self.matcher
        if not matcher.consume_token(token_id) or matcher.is_error():
            self.error = _short(matcher.get_error()) or f"token {token_id} is not allowed here"
        elif matcher.is_stopped():  # nothing more may follow
            self.complete = True
        else:
            self.needs_mask = True

    def _set_mask(self, raw: bytearray, accepting: bool) -> None:
        """`raw`: llguidance's next-token mask with its EOS bits cleared. The request's stop ids
        (EOS, stop_token_ids) end the output, so they are allowed exactly where it may end, even
        one the grammar would also take as text."""
        self.needs_mask = False
        words = memoryview(raw).cast("I")
        for t in self.stop_ids:
            words[t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
        has_tokens = raw.count(0) != len(raw)
        if has_tokens and accepting:
            for t in self.stop_ids:
                words[t >> 5] |= 1 << (t & 31)
        words.release()
        if has_tokens:
            self.mask = bytes(raw)
        elif accepting:  # only an end token may follow: the output is complete
            self.complete = True
        else:
            self.error = "the constraint allows no next token"


@dataclass(frozen=True)
class GuidedRows:
    """The guided rows of one sampling batch."""

    rows: list[int]  # [G] row of each guided sequence in the logits
    masks: torch.Tensor  # [G, W] int32 on the CPU: bit t of word t // 32 allows token t


class GuidedSequence(Protocol):
    """What `guided_rows` reads of an engine sequence (request.py's `Sequence`)."""

    @property
    def guided(self) -> GuidedState | None: ...


def guided_rows(seqs: Sequence[GuidedSequence]) -> GuidedRows | None:
    """The rows of `seqs` (one per logits row) that are guided, with their masks; None when none
    is (the unguided path does nothing more than this one scan)."""
    rows = [i for i, s in enumerate(seqs) if s.guided is not None]
    if not rows:
        return None
    masks = b"".join(seqs[i].guided.mask for i in rows)  # type: ignore[union-attr]
    return GuidedRows(rows, torch.frombuffer(bytearray(masks), dtype=torch.int32).view(len(rows), -1))


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_mask(logits: torch.Tensor, guided: GuidedRows) -> torch.Tensor:
    """`logits` [R, V] float with the disallowed tokens of the guided rows at -inf (a new tensor:
    the input may be a CUDA graph's output buffer). Vectorised: one unpack of all masks' bits."""
    dev = logits.device
    vocab = logits.shape[1]
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    words = guided.masks.to(dev, non_blocking=True)  # [G, W]
    allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)  # [G, W * 32]
    if allowed.shape[1] < vocab:  # ids past the mask (never the case for the model's own vocab)
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab]
    index = torch.tensor(guided.rows, dtype=torch.int64).to(dev, non_blocking=True)
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, index, masked)
