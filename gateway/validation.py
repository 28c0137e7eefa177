"""One validation path for HTTP and gRPC: OpenAI request JSON -> `protocol.py` dataclasses.

Every problem is a 400 naming the field. A field we know but do not support yet (e.g.
`suffix`) is refused with a message saying so, and an unknown field is refused too: nothing a
client sends is silently ignored. Structured outputs (`response_format`, `guided_*`) are read by
`structured_output.py`, forced tool choices become their JSON schema in `tool_schema.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gateway import structured_output
from gateway.downstream import Guided
from gateway.errors import APIError, invalid
from gateway.limits import DEFAULT_LIMITS, Limits
from gateway.media import MAX_IMAGES_PER_REQUEST, check_image_part
from gateway.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationParams,
    Prompt,
    TokenizeRequest,
)
from gateway.tool_schema import ForcedToolChoice, forced_guided
from services.common.sampling import MAX_UINT32, SamplingError, SamplingParams, validate_sampling

# Fields OpenAI (or vLLM) define that we accept only at their neutral value. (Chat and completions
# read the structured-output fields themselves; the entries below still apply to /tokenize.)
_NEUTRAL: dict[str, Any] = {
    "response_format": ({"type": "text"}, None),
    "suffix": ("", None),
    "best_of": (1, None),
    "store": (False, None),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "functions": (None,),
    "function_call": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "use_beam_search": (False, None),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}


class Fields:
    """Reads and type-checks fields of a JSON object, remembering which were consumed."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix
        self.seen: set[str] = set()

    def _name(self, key: str) -> str:
        return self.prefix + key

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.body.get(key)

    def string(self, key: str, default: str | None = None, allow_empty: bool = True) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise invalid(f"'{self._name(key)}' must be a string", self._name(key))
        if not allow_empty and not value:
            raise invalid(f"'{self._name(key)}' must not be empty", self._name(key))
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(f"'{self._name(key)}' must be a boolean", self._name(key))
        return value

    def integer(self, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{self._name(key)}' must be an integer", self._name(key))
        self._range(key, value, lo, hi)
        return value

    def number(
        self, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
    ) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid(f"'{self._name(key)}' must be a number", self._name(key))
        if lo_open and lo is not None and value <= lo:
            raise invalid(f"'{self._name(key)}' must be > {lo}, got {value}", self._name(key))
        self._range(key, value, lo, hi)
        return float(value)

    def _range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            raise invalid(f"'{self._name(key)}' must be >= {lo}, got {value}", self._name(key))
        if hi is not None and value > hi:
            raise invalid(f"'{self._name(key)}' must be <= {hi}, got {value}", self._name(key))

    def obj(self, key: str) -> dict[str, Any] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid(f"'{self._name(key)}' must be an object", self._name(key))
        return value

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self.raw(key)
        if value is None:
            return ()
        ids = _token_ids(value) if isinstance(value, list) else None
        if ids is None:
            raise invalid(f"'{self._name(key)}' must be a list of non-negative integers", self._name(key))
        return ids

    def reject_rest(self, allowed_extra: frozenset[str] = frozenset()) -> None:
        """Refuse fields not consumed: known ones not supported yet, then unknown ones."""
        for key, value in self.body.items():
            if key in self.seen or key in allowed_extra:
                continue
            if key in _NEUTRAL:
                if any(value == neutral for neutral in _NEUTRAL[key]):
                    continue
                raise invalid(
                    f"'{self._name(key)}' is not supported yet (value {_short(value)})", self._name(key)
                )
            raise invalid(f"unknown or unsupported field '{self._name(key)}'", self._name(key))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_token_id(value: Any) -> bool:
    # 7.0 is an integer in JSON Schema (and in `Fields.integer`), so a token id too.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT32


def _token_ids(values: list[Any]) -> tuple[int, ...] | None:
    """`values` as token ids, or None if one is not a token id. A prompt of ids is thousands of
    JSON integers: checked by type and range in C first (`_is_token_id` per value only when some
    value is not a plain int, such as 7.0)."""
    if values and set(map(type, values)) == {int}:
        return tuple(values) if min(values) >= 0 and max(values) <= MAX_UINT32 else None
    return tuple(int(v) for v in values) if all(_is_token_id(v) for v in values) else None


def _stop(f: Fields, max_stop_strings: int) -> tuple[str, ...]:
    value = f.raw("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(value) > max_stop_strings:
        raise invalid(
            f"'stop' has {len(value)} strings; at most {max_stop_strings} are allowed (--max-stop-strings)",
            "stop",
        )
    if any(not s for s in value):
        raise invalid("'stop' strings must not be empty", "stop")
    return tuple(value)


def _logit_bias(f: Fields) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a JSON object's string key) -> bias; the ranges and the entry
    count are `check_logit_bias`'s, the vocabulary the executor's (it knows the model)."""
    value = f.obj("logit_bias")
    if not value:
        return ()
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise invalid(
                f"'logit_bias' keys must be token ids (non-negative integers), got {key!r}", "logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise invalid(
                f"'logit_bias' values must be numbers, got {_short(bias)} for {key!r}", "logit_bias"
            )
        if int(key) in out:
            raise invalid(f"'logit_bias' names token {int(key)} twice", "logit_bias")
        out[int(key)] = float(bias)
    return tuple(sorted(out.items()))


def _limited(f: Fields, key: str, value: int | None, limit: int, option: str) -> int | None:
    if value is not None and limit and value > limit:
        raise invalid(f"'{key}' must be <= {limit}, got {value} ({option})", key)
    return value


def _params(f: Fields, *, chat: bool, limits: Limits) -> GenerationParams:
    """Types and this gateway's limits here; the ranges are `validate_sampling`'s (one home, shared
    with the worker), its complaints named by the request's own field."""
    max_tokens_key = "max_tokens"
    max_tokens = _limited(f, "max_tokens", f.integer("max_tokens"), limits.max_tokens, "--max-tokens")
    if chat:
        max_completion_tokens = _limited(
            f,
            "max_completion_tokens",
            f.integer("max_completion_tokens"),
            limits.max_tokens,
            "--max-tokens",
        )
        if max_completion_tokens is not None:
            max_tokens, max_tokens_key = max_completion_tokens, "max_completion_tokens"
    n = _limited(f, "n", f.integer("n"), limits.max_n, "--max-n")
    min_tokens = f.integer("min_tokens")
    top_k = f.integer("top_k")
    stream = f.boolean("stream", False)
    stream_options = f.obj("stream_options")
    include_usage = continuous_usage = False
    if stream_options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        so = Fields(stream_options, "stream_options.")
        include_usage = so.boolean("include_usage", False)
        continuous_usage = so.boolean("continuous_usage_stats", False)
        so.reject_rest()
    logprobs_key = "logprobs"
    if chat:
        want_logprobs = f.boolean("logprobs", False)
        top_logprobs = _limited(
            f, "top_logprobs", f.integer("top_logprobs"), limits.max_logprobs, "--max-logprobs"
        )
        if top_logprobs is not None and not want_logprobs:
            raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        logprobs = (top_logprobs or 0) if want_logprobs else None
        logprobs_key = "top_logprobs"
    else:
        logprobs = _limited(f, "logprobs", f.integer("logprobs"), limits.max_logprobs, "--max-logprobs")
    prompt_logprobs = _limited(
        f, "prompt_logprobs", f.integer("prompt_logprobs"), limits.max_logprobs, "--max-logprobs"
    )
    if prompt_logprobs is not None and stream:  # vLLM: stream chunks have no place for them
        raise invalid("'prompt_logprobs' is not available when 'stream' is true", "prompt_logprobs")
    # an int64, as OpenAI's schema says; the worker's seed is the uint64 of the same bits
    seed = f.integer("seed", lo=-(2**63), hi=2**63 - 1)
    fan_out = _fan_out(f, limits, stream)
    temperature = f.number("temperature")
    if fan_out.get("use_beam_search") and temperature is None:
        temperature = 0.0  # beam search is deterministic: unset means 0 (an explicit > 0 is refused)
    given: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": f.number("top_p"),
        "n": n,
        "seed": None if seed is None else seed % 2**64,
        "presence_penalty": f.number("presence_penalty"),
        "frequency_penalty": f.number("frequency_penalty"),
        "top_k": None if top_k == -1 else top_k,  # -1 (vLLM's "off") is the dataclass's 0
        "min_p": f.number("min_p"),
        "repetition_penalty": f.number("repetition_penalty"),
        "min_tokens": min_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        **fan_out,
    }
    sampling: SamplingParams[Guided] = SamplingParams(
        **{name: value for name, value in given.items() if value is not None},
        ignore_eos=f.boolean("ignore_eos", False),
        stop_token_ids=f.int_list("stop_token_ids"),
        guided=structured_output.parse({name: f.raw(name) for name in structured_output.FIELDS}),
        logit_bias=_logit_bias(f),
    )
    try:
        validate_sampling(sampling)
    except SamplingError as exc:
        renamed = {"max_tokens": max_tokens_key, "logprobs": logprobs_key}
        if sampling.guided is not None:
            renamed["guided"] = sampling.guided.param
        param = renamed.get(exc.field, exc.field)
        raise invalid(f"'{param}' {exc.message}", param) from None
    return GenerationParams(
        sampling=sampling,
        stop=_stop(f, limits.max_stop_strings),
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        include_stop_str_in_output=f.boolean("include_stop_str_in_output", False),
        stream=stream,
        include_usage=include_usage,
        user=f.string("user", "") or "",
        continuous_usage=continuous_usage,
    )


MAX_BEST_OF = 20  # OpenAI's bound (best_of is also vLLM's beam width)


def _fan_out(f: Fields, limits: Limits, stream: bool) -> dict[str, Any]:
    """best_of and vLLM's beam-search fields (docs/beam_search.md), and the streaming they refuse:
    the best of several sequences is known only when all of them are done."""
    best_of = _limited(f, "best_of", f.integer("best_of", hi=MAX_BEST_OF), limits.max_n, "--max-n")
    use_beam_search = f.boolean("use_beam_search", False)
    length_penalty = f.number("length_penalty")
    early_stopping = f.raw("early_stopping")
    if early_stopping is not None and not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise invalid(
            f"'early_stopping' must be true, false or \"never\", got {_short(early_stopping)}",
            "early_stopping",
        )
    if stream and use_beam_search:
        raise invalid(
            "'use_beam_search' does not support 'stream': the beams are ranked when all are done", "stream"
        )
    n = f.body.get("n") or 1
    if stream and best_of is not None and isinstance(n, int) and best_of > n:
        raise invalid(
            "'best_of' greater than 'n' cannot be streamed (as OpenAI): set 'stream' false", "best_of"
        )
    given = {
        "best_of": best_of,
        "use_beam_search": use_beam_search or None,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
    }
    return {name: value for name, value in given.items() if value is not None}


_ROLES = {"system", "developer", "user", "assistant", "tool", "function", "ipython"}


def _messages(value: Any, param: str = "messages") -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise invalid(f"'{param}' must be a non-empty list of messages", param)
    out: list[dict[str, Any]] = []
    num_images = 0
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"'{where}.role' must be a non-empty string", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if not isinstance(part, dict) or "type" not in part:
                    raise invalid(f"'{pwhere}' must be an object with a 'type'", pwhere)
                if part["type"] == "image_url":
                    check_image_part(part, pwhere)
                    num_images += 1
                    if num_images > MAX_IMAGES_PER_REQUEST:
                        raise invalid(f"at most {MAX_IMAGES_PER_REQUEST} images per request", pwhere)
                    continue
                if part["type"] != "text":
                    raise invalid(
                        f"content part type {part['type']!r} is not supported (only 'text' and 'image_url')",
                        pwhere,
                    )
                if not isinstance(part.get("text"), str):
                    raise invalid(f"'{pwhere}.text' must be a string", f"{pwhere}.text")
        elif content is not None and not isinstance(content, str):
            raise invalid(
                f"'{where}.content' must be a string, a list of content parts or null", f"{where}.content"
            )
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise invalid(f"'{where}.tool_calls' must be a list", f"{where}.tool_calls")
            for j, call in enumerate(tool_calls):
                cwhere = f"{where}.tool_calls[{j}]"
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    raise invalid(f"'{cwhere}' must be an object with a 'function' object", cwhere)
                if not isinstance(call["function"].get("name"), str):
                    raise invalid(f"'{cwhere}.function.name' must be a string", f"{cwhere}.function.name")
        out.append(message)
    return tuple(out)


def _tools(f: Fields, max_tools: int) -> list[dict[str, Any]] | None:
    tools = f.raw("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list", "tools")
    if max_tools and len(tools) > max_tools:
        raise invalid(
            f"'tools' has {len(tools)} tools; at most {max_tools} are allowed (--max-tools)", "tools"
        )
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid(f"'{where}' must be an object of type 'function'", where)
        function = tool.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise invalid(f"'{where}.function.name' must be a non-empty string", f"{where}.function.name")
        if "parameters" in function and not isinstance(function["parameters"], (dict, type(None))):
            raise invalid(f"'{where}.function.parameters' must be an object", f"{where}.function.parameters")
        if not isinstance(function.get("strict"), (bool, type(None))):
            raise invalid(f"'{where}.function.strict' must be a boolean", f"{where}.function.strict")
    return tools or None


def _tool_choice(f: Fields, tools: list[dict[str, Any]] | None) -> tuple[str, ForcedToolChoice | None]:
    """("none" | "auto" | "required" | "named", the forced choice for the last two)."""
    value = f.raw("tool_choice")
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto"):
        if value == "auto" and not tools:
            raise invalid("'tool_choice' is 'auto' but no 'tools' were given", "tool_choice")
        return str(value), None
    if value == "required":
        if not tools:
            raise invalid("'tool_choice' is 'required' but no 'tools' were given", "tool_choice")
        return "required", ForcedToolChoice("required")
    if isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if value.get("type") != "function" or not isinstance(name, str) or set(value) - {"type", "function"}:
            raise invalid(
                "'tool_choice' object must be {'type': 'function', 'function': {'name': ...}}", "tool_choice"
            )
        if not tools:
            raise invalid("'tool_choice' names a function but no 'tools' were given", "tool_choice")
        if not any((t.get("function") or {}).get("name") == name for t in tools):
            raise invalid(f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")
        return "named", ForcedToolChoice("named", name)
    raise invalid(
        "'tool_choice' must be 'none', 'auto', 'required' or a named function object", "tool_choice"
    )


def _template_options(f: Fields) -> tuple[str | None, dict[str, Any] | None, bool, bool]:
    chat_template = f.string("chat_template")
    kwargs = f.obj("chat_template_kwargs")
    add_generation_prompt = f.boolean("add_generation_prompt", True)
    continue_final_message = f.boolean("continue_final_message", False)
    if continue_final_message and add_generation_prompt and "add_generation_prompt" in f.body:
        raise invalid(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            "continue_final_message",
        )
    if continue_final_message:
        add_generation_prompt = False
    return chat_template, kwargs, add_generation_prompt, continue_final_message


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # OpenAI's enum


def _reasoning_effort(f: Fields, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """`reasoning_effort` as the chat template variable of that name (gpt-oss's template writes
    "Reasoning: <effort>" into its system message; vLLM passes it the same way); a value in
    `chat_template_kwargs` wins. Templates that do not read it ignore it."""
    effort = f.string("reasoning_effort")
    if effort is None:
        return kwargs
    if effort not in REASONING_EFFORTS:
        raise invalid(
            f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)} (got {_short(effort)})",
            "reasoning_effort",
        )
    return {"reasoning_effort": effort, **(kwargs or {})}


def _documents(f: Fields) -> list[Any] | None:
    documents = f.raw("documents")
    if documents is not None and (
        not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents)
    ):
        raise invalid("'documents' must be a list of objects", "documents")
    return documents or None


def parse_chat(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> ChatRequest:
    f = Fields(body)
    model = f.string("model", "") or ""
    messages = _messages(f.raw("messages"))
    params = _params(f, chat=True, limits=limits)
    tools = _tools(f, limits.max_tools)
    tool_choice, forced = _tool_choice(f, tools)
    parallel_tool_calls = f.boolean("parallel_tool_calls", True)
    chat_template, kwargs, add_generation_prompt, continue_final_message = _template_options(f)
    kwargs = _reasoning_effort(f, kwargs)
    documents = _documents(f)
    f.reject_rest()
    if continue_final_message and messages[-1].get("role") != "assistant":
        raise invalid(
            "'continue_final_message' needs the last message to be an assistant message", "messages"
        )
    if forced is not None:
        assert tools is not None
        if params.sampling.guided is not None:
            raise invalid(
                f"'tool_choice' {tool_choice!r} makes the output tool calls; it cannot be combined with "
                f"'{params.sampling.guided.param}' (give at most one structured-output constraint)",
                "tool_choice",
            )
        if params.sampling.use_beam_search:
            raise invalid(
                f"'tool_choice' {tool_choice!r} (a structured output) is not supported with 'use_beam_search'",
                "tool_choice",
            )
        guided = forced_guided(tools, forced, parallel_tool_calls)
        params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, guided=guided))
    return ChatRequest(
        model=model,
        messages=messages,
        params=params,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        chat_template=chat_template,
        chat_template_kwargs=kwargs,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        documents=documents,
        forced_tool=forced,
    )


def text_or_token_ids(value: Any) -> tuple[str | tuple[int, ...], ...] | None:
    """OpenAI's four forms of a prompt (or an embeddings input): a string, a list of strings,
    token ids, a list of token-id lists (non-empty); None for anything else."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return tuple(value)
        ids = _token_ids(value)
        if ids is not None:
            return (ids,)
        lists = [_token_ids(v) if isinstance(v, list) and v else None for v in value]
        if all(ids is not None for ids in lists):
            return tuple(ids for ids in lists if ids is not None)
    return None


def _prompts(value: Any) -> tuple[Prompt, ...]:
    forms = text_or_token_ids(value)
    if forms is not None:
        return forms
    raise invalid(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists "
        "(non-empty)",
        "prompt",
    )


def parse_completion(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> CompletionRequest:
    f = Fields(body)
    model = f.string("model", "") or ""
    if "prompt" not in body:
        raise invalid("'prompt' is required", "prompt")
    prompts = _prompts(f.raw("prompt"))
    params = _params(f, chat=False, limits=limits)
    echo = f.boolean("echo", False)
    add_special_tokens = f.boolean("add_special_tokens", True)
    f.reject_rest()
    if any(p == "" for p in prompts):
        raise invalid("'prompt' must not be empty", "prompt")
    return CompletionRequest(
        model=model, prompts=prompts, params=params, echo=echo, add_special_tokens=add_special_tokens
    )


def parse_tokenize(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> TokenizeRequest:
    f = Fields(body)
    model = f.string("model", "") or ""
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise invalid("give exactly one of 'prompt' or 'messages'", "prompt")
    prompt = f.string("prompt") if has_prompt else None
    messages = _messages(f.raw("messages")) if has_messages else None
    tools = _tools(f, limits.max_tools)
    chat_template, kwargs, add_generation_prompt, continue_final_message = _template_options(f)
    # vLLM: chat prompts are already templated, so no extra special tokens by default.
    add_special_tokens = f.boolean("add_special_tokens", not has_messages)
    return_token_strs = f.boolean("return_token_strs", False)
    f.reject_rest()
    if has_prompt and (tools or chat_template is not None or kwargs):
        raise APIError(400, "'tools' and chat template options need 'messages', not 'prompt'", param="prompt")
    return TokenizeRequest(
        model=model,
        prompt=prompt,
        messages=messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        add_special_tokens=add_special_tokens,
        chat_template=chat_template,
        chat_template_kwargs=kwargs,
        return_token_strs=return_token_strs,
    )


def parse_detokenize(body: dict[str, Any]) -> DetokenizeRequest:
    f = Fields(body)
    model = f.string("model", "") or ""
    if "tokens" not in body:
        raise invalid("'tokens' is required", "tokens")
    tokens = f.int_list("tokens")
    f.reject_rest()
    return DetokenizeRequest(model=model, tokens=tokens)
