"""OpenAI response bodies and stream chunks built from `ChoiceUpdate`s (chat and completions).

Both front ends use these dicts: HTTP serialises them as JSON / SSE, gRPC converts them to the
Inference protos.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.execution import SYSTEM_FINGERPRINT, ChoiceUpdate, LogprobItem, RequestRun
from gateway.forced_tool_calls import ForcedCalls
from gateway.tool_schema import ForcedToolChoice


def usage(run: RequestRun, so_far: bool = False) -> dict[str, Any]:
    """OpenAI's usage object; `so_far`: mid-stream, counting the output tokens received up to now."""
    prompt = run.prompt_tokens
    completion = run.completion_tokens_so_far if so_far else run.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": run.cached_tokens},
    }


def _chat_logprob(item: LogprobItem) -> dict[str, Any]:
    return {
        "token": item.token,
        "logprob": _finite(item.logprob),
        "bytes": list(item.raw),
        "top_logprobs": [{"token": t, "logprob": _finite(lp), "bytes": list(raw)} for t, raw, lp in item.top],
    }


def vllm_prompt_logprobs(items: tuple[LogprobItem, ...], k: int) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first has none: null) a map of token id ->
    {logprob, rank, decoded_token} holding the prompt's own token and the k most likely ones."""
    out: list[dict[str, Any] | None] = []
    for item in items:
        if item.logprob is None:
            out.append(None)
            continue
        entry = {
            str(item.token_id): {
                "logprob": _finite(item.logprob),
                "rank": item.rank,
                "decoded_token": item.token,
            }
        }
        for rank, (token_id, (text, _, logprob)) in enumerate(
            zip(item.top_ids[:k], item.top[:k], strict=True), 1
        ):
            entry.setdefault(
                str(token_id), {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}
            )
        out.append(entry)
    return out


def _finite(value: float | None) -> float | None:
    # JSON has no -inf; OpenAI clients expect a number, so clamp like vLLM does.
    if value is None:
        return None
    return max(value, -9999.0) if not math.isnan(value) else -9999.0


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class _ChatChoice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    logprobs: list[LogprobItem] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # stream: role chunk sent
    in_reasoning: bool = False  # its latest text was reasoning: held-back text is empty reasoning
    forced: ForcedCalls | None = None  # a forced tool choice: the text becomes tool calls


def _finish(choice: _ChatChoice, reason: str | None) -> str | None:
    # A forced tool choice decides its own finish reason (forced_tool_calls.py).
    if reason == "stop" and choice.tool_calls and choice.forced is None:
        return "tool_calls"
    return reason


def _content(text: str, reasoning: str, tool_calls: list[Any], forced: ForcedToolChoice | None) -> str | None:
    """The whole message's `content`: null, as OpenAI gives it, when the answer is only tool calls
    (always so for a forced tool choice) or only reasoning; "" for an answer that is empty."""
    if forced is not None:
        return None
    if text:
        return text
    return None if tool_calls or reasoning else ""


def new_call_id() -> str:
    """An OpenAI-style tool-call id: "call_" + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


class ChatResult:
    """Accumulates a chat completion; gives the whole response or the stream chunks."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        num_choices: int,
        logprobs: bool,
        parallel_tool_calls: bool,
        include_usage: bool = False,
        forced: ForcedToolChoice | None = None,
        prompt_logprobs: int | None = None,
    ) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.prompt_logprobs = prompt_logprobs
        self.model = model
        self.created = created
        self.logprobs = logprobs
        self.parallel_tool_calls = parallel_tool_calls
        self.include_usage = include_usage
        self.forced = forced
        self.choices = [
            _ChatChoice(forced=ForcedCalls(forced, new_call_id) if forced is not None else None)
            for _ in range(num_choices)
        ]

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _tool_deltas(self, choice: _ChatChoice, update: ChoiceUpdate) -> list[dict[str, Any]]:
        out = []
        for d in update.tool_calls:
            if not self.parallel_tool_calls and d.index > 0:
                continue  # parallel_tool_calls=false: only the first call is returned
            call = choice.tool_calls.setdefault(d.index, _ToolCall())
            delta: dict[str, Any] = {"index": d.index}
            if d.id:
                call.id = d.id
                delta["id"] = d.id
                delta["type"] = "function"
            function: dict[str, str] = {}
            if d.name:
                call.name += d.name
                function["name"] = d.name
            if d.id or d.arguments:  # OpenAI's first delta of a call has "arguments", "" included
                call.arguments += d.arguments
                function["arguments"] = d.arguments
            if function:
                delta["function"] = function
            out.append(delta)
        return out

    def add(self, update: ChoiceUpdate) -> list[dict[str, Any]]:
        """Record an update; return the stream chunks it makes."""
        choice = self.choices[update.index]
        if choice.forced is not None:
            update = choice.forced.convert(update)
        chunks: list[dict[str, Any]] = []
        if not choice.started:
            choice.started = True
            # A forced tool choice has no content at all (null, as in the whole response).
            content = "" if self.forced is None else None
            chunks.append(self._chunk(update.index, {"role": "assistant", "content": content}, None, None))
        choice.text.append(update.text)
        choice.reasoning.append(update.reasoning)
        choice.logprobs.extend(update.logprobs)
        tool_deltas = self._tool_deltas(choice, update)
        delta: dict[str, Any] = {}
        if update.reasoning:
            delta["reasoning_content"] = update.reasoning
        if update.text:
            delta["content"] = update.text
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        if update.text or update.reasoning:
            choice.in_reasoning = not update.text
        if not delta and update.num_new_tokens and self.forced is None and not choice.tool_calls:
            # New tokens whose text is held back: an empty chunk all the same, as vLLM sends
            # (`delta: {}` under a forced tool choice, whose content is null, and once a tool
            # call has begun, where the parser holds the call's text).
            delta["reasoning_content" if choice.in_reasoning else "content"] = ""
        finish = _finish(choice, update.finish_reason)
        choice.finish_reason = finish
        logprobs = (
            {"content": [_chat_logprob(i) for i in update.logprobs], "refusal": None}
            if self.logprobs
            else None
        )
        if delta or finish or update.logprobs or update.num_new_tokens:
            chunks.append(self._chunk(update.index, delta, finish, logprobs))
        return chunks

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk")
        chunk["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, run: RequestRun) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk")
        chunk["choices"] = []
        chunk["usage"] = usage(run)
        return chunk

    def response(self, run: RequestRun) -> dict[str, Any]:
        body = self._envelope("chat.completion")
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            reasoning = "".join(c.reasoning)
            tool_calls = [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                for _, t in sorted(c.tool_calls.items())
            ]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": _content(text, reasoning, tool_calls, self.forced),
            }
            message["refusal"] = None  # required by OpenAI's schema; tandem never refuses
            if tool_calls:  # OpenAI sends no "tool_calls" key, rather than [], when there are none
                message["tool_calls"] = tool_calls
            if reasoning:
                message["reasoning_content"] = reasoning
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": [_chat_logprob(x) for x in c.logprobs], "refusal": None}
                    if self.logprobs
                    else None,
                    "finish_reason": c.finish_reason or "stop",
                }
            )
        body["choices"] = choices
        body["usage"] = usage(run)
        if self.prompt_logprobs is not None:  # vLLM puts a chat's at the top level
            body["prompt_logprobs"] = vllm_prompt_logprobs(
                run.prompts[0].prompt_logprobs, self.prompt_logprobs
            )
        return body

    def finish_reasons(self) -> list[str]:
        return [c.finish_reason or "" for c in self.choices]


@dataclass
class _TextChoice:
    text: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0
    finish_reason: str | None = None
    started: bool = False
    prompt_logprobs: tuple[LogprobItem, ...] = ()  # its prompt's, for vLLM's `prompt_logprobs`


class CompletionResult:
    """Accumulates a text completion; gives the whole response or the stream chunks."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        num_choices: int,
        logprobs: int | None,
        echo: bool,
        include_usage: bool = False,
        prompt_logprobs: int | None = None,
    ) -> None:
        self.id = f"cmpl-{request_id}"
        self.prompt_logprobs = prompt_logprobs
        self.model = model
        self.created = created
        self.logprobs = logprobs
        self.echo = echo
        self.include_usage = include_usage
        self.choices = [_TextChoice() for _ in range(num_choices)]

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _logprobs_piece(
        self, choice: _TextChoice, items: tuple[LogprobItem, ...] | list[LogprobItem]
    ) -> dict[str, Any]:
        piece: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for item in items:
            # (echoed prompt positions may carry more alternatives, for vLLM's prompt_logprobs)
            top = (
                {t: _finite(lp) for t, _, lp in item.top[: self.logprobs]}
                if item.logprob is not None
                else None
            )
            # OpenAI includes the sampled token among the alternatives.
            if top is not None and item.token not in top and self.logprobs:
                top[item.token] = _finite(item.logprob)
            for key, value in (
                ("tokens", item.token),
                ("token_logprobs", _finite(item.logprob)),
                ("top_logprobs", top),
                ("text_offset", choice.offset),
            ):
                piece[key].append(value)
                getattr(choice, key).append(value)
            choice.offset += len(item.token)
        return piece

    def add(self, update: ChoiceUpdate) -> list[dict[str, Any]]:
        choice = self.choices[update.index]
        text = update.text
        items: list[LogprobItem] = list(update.logprobs)
        if not choice.started:
            choice.started = True
            choice.prompt_logprobs = update.prompt.prompt_logprobs
            if self.echo:
                text = (update.prompt.text or "") + text
                items = list(update.prompt.prompt_logprobs) + items
        choice.text.append(text)
        logprobs = self._logprobs_piece(choice, items) if self.logprobs is not None else None
        choice.finish_reason = update.finish_reason
        chunk = self._envelope()
        chunk["choices"] = [
            {"index": update.index, "text": text, "logprobs": logprobs, "finish_reason": update.finish_reason}
        ]
        if self.include_usage:
            chunk["usage"] = None
        # (new tokens whose text is held back make a chunk of "" text, as vLLM sends)
        return [chunk] if text or update.finish_reason or items or update.num_new_tokens else []

    def usage_chunk(self, run: RequestRun) -> dict[str, Any]:
        chunk = self._envelope()
        chunk["choices"] = []
        chunk["usage"] = usage(run)
        return chunk

    def response(self, run: RequestRun) -> dict[str, Any]:
        body = self._envelope()
        body["choices"] = [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": {
                    "tokens": c.tokens,
                    "token_logprobs": c.token_logprobs,
                    "top_logprobs": c.top_logprobs,
                    "text_offset": c.text_offset,
                }
                if self.logprobs is not None
                else None,
                "finish_reason": c.finish_reason or "stop",
                **(
                    {"prompt_logprobs": vllm_prompt_logprobs(c.prompt_logprobs, self.prompt_logprobs)}
                    if self.prompt_logprobs is not None
                    else {}
                ),
            }
            for i, c in enumerate(self.choices)
        ]
        body["usage"] = usage(run)
        return body

    def finish_reasons(self) -> list[str]:
        return [c.finish_reason or "" for c in self.choices]
