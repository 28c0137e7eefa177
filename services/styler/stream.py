"""One DetokenizeStream: token-id deltas of several choices in, text deltas out.

Per choice, text flows  token ids -> IncrementalDetokenizer -> StopMatcher ->
reasoning parser -> tool parser -> StreamDelta. Each stage holds back what it cannot decide
yet and releases it at `finished` (or at a stop string, after which the choice ignores further
tokens). Malformed tool calls become content; no model output raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.reasoning import prompt_opens_reasoning
from services.styler.detokenizer import IncrementalDetokenizer
from services.styler.parsers.base import ParsedText, ToolParser
from services.styler.parsers.harmony import HARMONY_MARKERS, HarmonyParser
from services.styler.parsers.reasoning import (
    THINK_END,
    THINK_START,
    ThinkReasoningParser,
    ids_open_reasoning,
    make_reasoning_parser,
)
from services.styler.parsers.tool_formats import TOOL_MARKERS, TOOL_PARSERS
from services.styler.stop_matcher import StopMatcher
from services.styler.tokenizer import Tokenizer


@dataclass(frozen=True)
class StreamOptions:
    """Everything a stream needs to know about its request (DetokenizeStreamStart)."""

    request_id: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    tool_parser: str = ""  # "" = off, "auto" = the model's, or a parser name
    reasoning_parser: str = ""  # "" = off, "auto" = the model's, or a parser name
    num_choices: int = 1
    first_choice_index: int = 0
    prompt_opens_reasoning: bool = False


@dataclass(frozen=True)
class ToolCallDelta:
    """A tool call as an OpenAI streaming delta (the styler sends each call whole)."""

    index: int  # position of the call within the choice's message
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class StreamDelta:
    """New output of one choice."""

    index: int
    text: str = ""
    reasoning_text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    stopped: bool = False
    matched_stop: str = ""
    finished: bool = False
    num_tokens: int = 0  # token ids of the choice taken so far
    num_new_tokens: int = 0  # of which this delta took (0 once the choice is done)

    def is_empty(self) -> bool:
        """Nothing to send. A delta that took new ids is sent even when all their text is held
        back (an incomplete character, a run of byte tokens, a parser's undecided marker): as
        vLLM does, the client gets a chunk per token, and so times first token and inter-token
        latency by tokens rather than characters."""
        return not (
            self.text
            or self.reasoning_text
            or self.tool_calls
            or self.stopped
            or self.finished
            or self.num_new_tokens
        )


class ChoiceStream:
    """The detokenizer, stop matcher and parsers of one choice."""

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        options: StreamOptions,
        tool_parser: ToolParser | None,
        reasoning_parser: ThinkReasoningParser | HarmonyParser | None,
        keep_token_ids: frozenset[int],
    ) -> None:
        self.index = index
        self._detok = IncrementalDetokenizer(
            tokenizer, options.skip_special_tokens, keep_token_ids, options.prompt_token_ids
        )
        self._stop = StopMatcher(options.stop, options.include_stop_str_in_output)
        self._tool = tool_parser
        self._reasoning = reasoning_parser
        self._num_tool_calls = 0
        self.done = False

    @property
    def num_tokens(self) -> int:
        return self._detok.num_tokens

    def add(self, token_ids: Sequence[int], finished: bool) -> StreamDelta:
        """Feed new ids (any number: the worker merges steps when it falls behind). With stop
        strings they are fed one at a time, so a stop string completed in the middle of a delta
        ends the choice at its own token: `num_tokens` (and so the logprobs the gateway pairs with
        the text) is the same however the worker chunked the ids."""
        if len(token_ids) > 1 and self._stop.active and not self.done:
            merged = StreamDelta(index=self.index)
            for i, token_id in enumerate(token_ids):
                d = self._add((token_id,), finished and i == len(token_ids) - 1)
                merged.text += d.text
                merged.reasoning_text += d.reasoning_text
                merged.tool_calls.extend(d.tool_calls)
                merged.stopped, merged.matched_stop = d.stopped, d.matched_stop
                merged.finished, merged.num_tokens = d.finished, d.num_tokens
                merged.num_new_tokens += d.num_new_tokens
                if self.done:
                    break
            return merged
        return self._add(token_ids, finished)

    def _add(self, token_ids: Sequence[int], finished: bool) -> StreamDelta:
        delta = StreamDelta(index=self.index)
        if self.done:  # after a stop string or `finished`, further tokens are ignored
            delta.num_tokens = self._detok.num_tokens
            return delta
        num_before = self._detok.num_tokens
        text = self._detok.add(token_ids)
        if finished:
            text += self._detok.finish()
        stop = self._stop.feed(text)
        text = stop.text
        if stop.matched is not None:
            delta.stopped, delta.matched_stop = True, stop.matched
            finished = True
        elif finished:
            text += self._stop.flush()
        self._parse(delta, text, finished)
        delta.finished = finished
        delta.num_tokens = self._detok.num_tokens
        delta.num_new_tokens = delta.num_tokens - num_before
        self.done = finished
        return delta

    def _parse(self, delta: StreamDelta, text: str, finished: bool) -> None:
        parsed = ParsedText(content=text)
        if self._reasoning is not None:
            parsed = self._reasoning.feed(text)
            if finished:
                parsed.extend(self._reasoning.finish())
        if self._tool is not None:
            content, parsed.content = parsed.content, ""
            parsed.extend(self._tool.feed(content))
            if finished:
                parsed.extend(self._tool.finish())
        delta.text, delta.reasoning_text = parsed.content, parsed.reasoning
        for call in parsed.tool_calls:
            delta.tool_calls.append(ToolCallDelta(self._num_tool_calls, call.id, call.name, call.arguments))
            self._num_tool_calls += 1


class DetokenizeSession:
    """The state of one DetokenizeStream: one ChoiceStream per choice, created on first use."""

    def __init__(
        self, tokenizer: Tokenizer, options: StreamOptions, tool_parser: str, reasoning_parser: str
    ) -> None:
        if tool_parser and tool_parser not in TOOL_PARSERS:
            raise ValueError(f"start.tool_parser: unknown parser {tool_parser!r}")
        if options.num_choices < 1:
            raise ValueError("start.num_choices must be >= 1")
        tokenizer.check_ids(options.prompt_token_ids, "start.prompt_token_ids")
        self._prompt_opens_reasoning = options.prompt_opens_reasoning or (
            bool(reasoning_parser) and _prompt_ids_open_reasoning(tokenizer, options.prompt_token_ids)
        )
        self._tokenizer = tokenizer
        self.options = options
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser
        if reasoning_parser:
            make_reasoning_parser(reasoning_parser, False)  # validates the name
        markers = TOOL_MARKERS.get(tool_parser, ()) + (("<think>", "</think>") if reasoning_parser else ())
        if reasoning_parser == "harmony":
            markers += HARMONY_MARKERS
        self._keep_ids = frozenset(
            i for m in markers if (i := tokenizer.token_to_id(m)) is not None and i in tokenizer.special_ids
        )
        self._choices: dict[int, ChoiceStream] = {}

    def _choice(self, index: int) -> ChoiceStream:
        first = self.options.first_choice_index
        if not first <= index < first + self.options.num_choices:
            raise ValueError(
                f"deltas[].index {index} is outside the stream's choices [{first}, {first + self.options.num_choices})"
            )
        choice = self._choices.get(index)
        if choice is None:
            tool = TOOL_PARSERS[self.tool_parser]() if self.tool_parser else None
            reasoning = (
                make_reasoning_parser(self.reasoning_parser, self._prompt_opens_reasoning)
                if self.reasoning_parser
                else None
            )
            if self.tool_parser == "harmony" and self.reasoning_parser == "harmony":
                # One parser reads the messages for both: a call is a message of its own channel,
                # which the reasoning stage would otherwise pass on without its header.
                reasoning, tool = HarmonyParser("harmony", reasoning=True, tools=True), None
            choice = ChoiceStream(index, self._tokenizer, self.options, tool, reasoning, self._keep_ids)
            self._choices[index] = choice
        return choice

    def add(self, index: int, token_ids: Sequence[int], finished: bool) -> StreamDelta:
        """Feed one choice's new ids; the result may have no text (everything held back), and is
        empty only when it took no new ids either (none given, or the choice was already done).

        Ids the tokenizer does not know add no text (as `transformers`' decode and vLLM do): a
        model's embedding table is often padded past its tokenizer (Qwen2: 151,936 rows for
        151,669 tokens) and sampling may pick a padded row, which must not fail the request."""
        return self._choice(index).add(token_ids, finished)

    def num_tokens(self, index: int) -> int:
        """Token ids choice `index` has taken so far (0 before its first delta)."""
        choice = self._choices.get(index)
        return choice.num_tokens if choice is not None else 0

    def all_done(self) -> bool:
        return len(self._choices) == self.options.num_choices and all(c.done for c in self._choices.values())


# Enough of a prompt's end to hold the last message's open thought, where `<think>` is not one token.
_REASONING_TAIL_TOKENS = 4096


def _prompt_ids_open_reasoning(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the prompt leaves a `<think>` open (also a continued thought, not only a prompt
    that ends in `<think>`): decided here, from the ids, so every client of the stream gets it."""
    start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    if start is not None and end is not None:
        return ids_open_reasoning(prompt_ids, start, end)
    tail = tokenizer.decode(list(prompt_ids[-_REASONING_TAIL_TOKENS:]), skip_special_tokens=False)
    return prompt_opens_reasoning(tail)
