"""Guided constraints are checked in child processes before the worker compiles them.

llguidance compiles a grammar in native code: a Lark grammar of a few thousand chained rules
overflows its stack (SIGSEGV: the whole worker process dies), and a huge regex or schema can take
seconds and gigabytes. A constraint is one request's input, so compiling it must never cost the
worker. `GrammarChecker` keeps a few child processes, each with its own copy of the tokenizer,
that build the constraint's matcher and its first mask under

    RLIMIT_STACK  CHECK_STACK_BYTES   (a deeper grammar crashes the child, not the worker)
    RLIMIT_AS     CHECK_MEMORY_BYTES  (an allocation past it fails in the child)
    time          CHECK_TIMEOUT_S     (the child is killed and replaced)

A child that crashes or times out is replaced; the request gets INVALID_ARGUMENT naming the field.
The worker compiles a constraint only after it passed here, and on threads whose stack is
`WORKER_STACK_FACTOR` times the child's: the same native code on the same input needs the same
stack, so what passed in the child cannot overflow in the worker.

This module imports neither torch nor the engine: a child is `python -m services.worker.grammar_check`
(a fresh interpreter, never a fork of the threaded worker), talking over a socket pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import llguidance

from services.common.unreachable_tokens import unreachable_text

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

CHECK_PROCESSES = 2
# A constraint whose compilation needs more stack than this is refused (a chain of ~700 nested
# rules; real JSON schemas and grammars nest a few dozen levels).
CHECK_STACK_BYTES = 2 * 1024 * 1024
CHECK_MEMORY_BYTES = 4 * 1024**3
CHECK_TIMEOUT_S = 10.0
# The worker's grammar threads get this many times the child's stack (see the module docstring).
WORKER_STACK_FACTOR = 8
# Checks (and the worker's grammar threads) run at this lower CPU priority: a hostile constraint
# compiling for seconds must not slow the requests being served or the health checks.
CHECK_NICENESS = 10
# A child loads the tokenizer (about a second for a 150k vocabulary) before its first check.
START_TIMEOUT_S = 120.0

# JSON is generated as `{"a": 1, "b": [2, 3]}`: fixed separators and no free whitespace. With
# llguidance's default (any whitespace between tokens) small models loop on newlines and spaces
# until max_tokens; a schema can still ask for other settings with its "x-guidance" key.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar for one constraint; ValueError says why the text is not one."""
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object (or a boolean)")
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        values = json.loads(text)
        if not values:
            raise ValueError("needs at least one value")
        # Lark string literals; JSON string syntax is what llguidance's own "choice" uses.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(v) for v in values))
    return llguidance.LLMatcher.grammar_from_lark(text)


def llg_tokenizer(tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a tokenizer.json, with its added tokens made unreachable by text.

    llguidance writes forced text (a literal such as `<think>`) with the tokenizer, which splits out
    added tokens: `<think>` became Qwen3's single token 151667, which llguidance's own parser then
    refuses ("token doesn't satisfy the grammar"), failing the request mid-decode. With the added
    tokens' texts replaced by strings no request writes, a constraint's text is always written
    with ordinary tokens (the output reads `<think>`); the ids stay, so the vocabulary is intact,
    and the end tokens keep their text.
    """
    data = json.loads(tokenizer_json)
    keep = set(eos_token_ids)
    vocab = (data.get("model") or {}).get("vocab")
    in_model = set(vocab) if isinstance(vocab, dict) else set()  # renaming these would add a token
    for token in data.get("added_tokens") or ():
        if token.get("id") not in keep and token.get("content") not in in_model:
            token["content"] = unreachable_text(token.get("id"))
    return llguidance.LLTokenizer(json.dumps(data), n_vocab=vocab_size, eos_token=eos_token_ids or None)


# Decode steps the check walks after the first mask. llguidance builds its lexer lazily, so some
# constraints compile and give a first mask, then fail on the first token consumed (`a{1000000}`:
# "too many expressions constructed"): walking a few steps makes that a 400 up front, not a
# failure mid-decode after the request was admitted.
PROBE_STEPS = 4


def _first_allowed(mask: bytes, vocab_size: int, eos: set[int]) -> int | None:
    """The smallest token id the mask allows that is not an end token (None: only end tokens)."""
    for word_index in range(len(mask) // 4):
        word = int.from_bytes(mask[4 * word_index : 4 * word_index + 4], "little")
        while word:
            bit = word & -word
            token = 32 * word_index + bit.bit_length() - 1
            if token >= vocab_size:
                return None
            if token not in eos:
                return token
            word ^= bit
    return None


def check_constraint(tokenizer: llguidance.LLTokenizer, kind: str, text: str) -> str:
    """What the worker will do with a constraint (grammar, matcher, the first mask, then
    PROBE_STEPS steps along the first allowed token): "" when it compiles, else llguidance's
    error."""
    try:
        grammar = grammar_text(kind, text)
    except ValueError as exc:
        return str(exc) or "invalid constraint"
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if not matcher.is_error():
        mask = matcher.compute_bitmask()
        matcher.deep_copy()
        eos = set(tokenizer.eos_tokens)
        for _ in range(PROBE_STEPS):
            token = _first_allowed(mask, tokenizer.vocab_size, eos)
            if token is None or matcher.is_error() or not matcher.consume_token(token):
                break
            mask = matcher.compute_bitmask()
    return matcher.get_error() if matcher.is_error() else ""


# ---- the child -------------------------------------------------------------------------------


def _child_main() -> None:
    """A checking child: limits, tokenizer, then one check per message until the socket closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--stack", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True)
    args = parser.parse_args()
    conn = Connection(args.fd)
    tokenizer_json, vocab_size, eos_token_ids = conn.recv()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash is expected; no core files
    os.nice(CHECK_NICENESS)  # checks yield the CPU to serving
    resource.setrlimit(resource.RLIMIT_STACK, (args.stack, args.stack))
    resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    tokenizer = llg_tokenizer(tokenizer_json, vocab_size, eos_token_ids)
    conn.send("ready")
    while True:
        try:
            kind, text = conn.recv()
        except EOFError:
            return
        try:
            error = check_constraint(tokenizer, kind, text)
        except MemoryError:
            error = "compiling the constraint needs more memory than allowed"
        conn.send(error)


# ---- the pool --------------------------------------------------------------------------------


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    conn: Connection
    ready: bool = False


class GrammarChecker:
    """A small pool of checking children; `check` is blocking and thread-safe (one child each)."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: list[int],
        num_processes: int = CHECK_PROCESSES,
        timeout_s: float = CHECK_TIMEOUT_S,
        stack_bytes: int = CHECK_STACK_BYTES,
        memory_bytes: int = CHECK_MEMORY_BYTES,
    ) -> None:
        self._tokenizer = (tokenizer_json, vocab_size, list(eos_token_ids))
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self.stack_bytes = stack_bytes
        self.num_replaced = 0  # children killed (crash or timeout) and started again
        self.num_processes = num_processes
        self._idle: queue.Queue[_Child] = queue.Queue()
        self._lock = threading.Lock()
        self._children: list[_Child] = []
        self._num_started = 0  # children are started on demand: a worker never asked to guide has none

    def _start(self) -> _Child:
        parent, child = socket.socketpair()
        with child:
            argv = [sys.executable, "-m", __name__, "--fd", str(child.fileno())]
            argv += ["--stack", str(self.stack_bytes), "--memory", str(self.memory_bytes)]
            process = subprocess.Popen(
                argv,
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
            )
        conn = Connection(parent.detach())
        conn.send(self._tokenizer)
        new = _Child(process, conn)
        with self._lock:
            self._children.append(new)
        return new

    def _take(self) -> _Child:
        with self._lock:
            start = self._idle.empty() and self._num_started < self.num_processes
            if start:
                self._num_started += 1
        return self._start() if start else self._idle.get()

    def _replace(self, old: _Child) -> _Child:
        with self._lock:
            if old in self._children:
                self._children.remove(old)
        old.process.kill()
        old.process.wait()
        old.conn.close()
        self.num_replaced += 1
        return self._start()

    def check(self, kind: str, text: str) -> str:
        """ "" when the constraint compiles within the limits, else why not (for the client)."""
        child = self._take()
        try:
            if not child.ready:
                if not child.conn.poll(START_TIMEOUT_S):
                    raise EOFError
                child.conn.recv()  # "ready"
                child.ready = True
            child.conn.send((kind, text))
            if not child.conn.poll(self.timeout_s):
                log.warning("grammar check of a %s constraint timed out; replacing the checker", kind)
                child = self._replace(child)
                return f"compiling the constraint took longer than {self.timeout_s:g} s"
            result: str = child.conn.recv()
            return result
        except (EOFError, OSError):
            code = child.process.poll()
            log.warning(
                "grammar check of a %s constraint crashed its checker (exit %s); replacing it", kind, code
            )
            child = self._replace(child)
            return (
                "the constraint is too complex to compile (it exceeded the compiler's "
                f"{self.stack_bytes // 1024**2} MiB stack or its memory limit)"
            )
        finally:
            self._idle.put(child)

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
        for child in children:
            with contextlib.suppress(OSError):
                child.conn.close()
            child.process.kill()
            child.process.wait()


if __name__ == "__main__":
    _child_main()
