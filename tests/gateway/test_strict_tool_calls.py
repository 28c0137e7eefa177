"""Strict tool calls in `tool_choice: "auto"`, end to end on tiny models that write garbage.

Three families, each a tiny model with the real tokenizer and chat template from ../shared:
hermes (Qwen3), llama3_json (Llama 3.1) and deepseek_v3 (DeepSeek-V3). The models are random except for one thing: every
position's logits favour a few dozen tokens (the tool-call opener and closer, JSON punctuation, a
few words, the end token), so sampled at temperature 1 they open tool calls often and then write
nonsense. Over many seeded requests with the functions marked `"strict": true`, every tool call
the gateway returns must parse and validate against its function's schema, and no opener may be
left in the content; with strict off the share that does not is printed, and there must be some
(else the test proves nothing). Streamed requests must assemble to the same calls.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
from gateway_stack import Stack

pytestmark = [pytest.mark.e2e]

# requests per mode (seeded), per family: the crafted Qwen3 and DeepSeek models open calls in most
# replies, the Llama one in about one in three; with 24 requests each, strict mode gave 41 (Qwen3),
# 16 (DeepSeek) and 9 (Llama) valid calls (the check needs 5) and loose mode 44, 25 and 6 bad ones;
# with the counts below, 18, 13 and 9 valid and 15, 20 and 6 bad
NUM_REQUESTS = {"<tool_call>": 12, "<｜tool▁call▁begin｜>": 16, "{": 24}
MAX_TOKENS = 200
NUM_STREAMED = 8  # of the strict requests, also streamed and compared

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 2?"}]


def tools(strict: bool) -> list[dict[str, Any]]:
    out = []
    for name, schema in SCHEMAS.items():
        function: dict[str, Any] = {"name": name, "description": f"{name}.", "parameters": schema}
        if strict:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


# Text pieces the crafted models favour, with relative weights (the rest of the vocabulary is
# e^-25 less likely). Words of the schemas are here so that garbage sometimes comes close.
COMMON: dict[str, float] = {
    **{p: 3.0 for p in ("{", "}", '"', ":", ",", " ", "\n", "[", "]", "name", "arguments", "parameters")},
    **{p: 3.0 for p in ("get_weather", "add", "city", "unit", "Paris", "c", "a", "b", "1", "2", "7", "true")},
    **{p: 3.0 for p in ("hello", " the", " weather", "ok", ".", ";")},
}


def craft_model(
    shared_dir: Path, path: Path, tokenizer: str, make: Callable[[int], Any], favour: dict[str, float]
) -> Path:
    """A tiny model (`make(vocab_size)`) whose every next-token distribution is ~`favour` (plus
    a little noise from its random layer)."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / tokenizer / name, path / name)
    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    model = make(len(tok))
    config = model.config
    hidden = config.hidden_size
    with torch.no_grad():
        # Every token embeds to C * e0 (+ a little noise): after the final RMSNorm, dimension 0
        # is ~sqrt(hidden) at every position, so lm_head's column 0 sets each token's logit.
        embed = model.get_input_embeddings().weight
        embed.normal_(0, 0.01)
        embed[:, 0] = 10.0
        head = model.get_output_embeddings().weight
        head.normal_(0, 0.01)
        scale = math.sqrt(hidden)
        head[:, 0] = -25.0 / scale
        for piece, weight in favour.items():
            for token_id in tok.encode(piece, add_special_tokens=False):
                head[token_id, 0] = math.log(weight) / scale
    model.save_pretrained(str(path))
    return path


@dataclass
class Tally:
    """Tool-call attempts of one mode and how many of them did not give a valid call."""

    attempts: int = 0
    valid: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


def check_call(name: str, arguments: str) -> str:
    """ "" for a call of a listed function with schema-valid arguments, else why not."""
    if name not in SCHEMAS:
        return f"unknown function {name!r}"
    try:
        args = json.loads(arguments)
        jsonschema.validate(args, SCHEMAS[name])
    except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
        return f"{name}({arguments!r}): {str(exc).splitlines()[0]}"
    return ""


def unparsed_openers(content: str, opener: str, finish_reason: str, at_start_only: bool) -> int:
    """Tool-call openers left in the content: each a call the parser could not read. A call cut
    by max_tokens (the content's last opener, finish "length") is not counted against anyone."""
    found = int(content.lstrip().startswith(opener)) if at_start_only else content.count(opener)
    return found - 1 if found and finish_reason == "length" else found


def request(client: openai.OpenAI, model: str, seed: int, strict: bool) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=tools(strict),  # type: ignore[arg-type]
        tool_choice="auto",
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        seed=seed,
    )


def streamed(client: openai.OpenAI, model: str, seed: int) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) assembled from the stream's deltas."""
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=tools(True),  # type: ignore[arg-type]
        tool_choice="auto",
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        seed=seed,
        stream=True,
    )
    content, calls, finish = "", {}, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                name, args = calls.get(delta.index, ("", ""))
                fn = delta.function
                calls[delta.index] = (
                    name + ((fn.name or "") if fn else ""),
                    args + ((fn.arguments or "") if fn else ""),
                )
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def run_family(stack: Stack, opener: str, at_start_only: bool) -> dict[bool, Tally]:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=300)
    model = stack.model.name
    tallies = {True: Tally(), False: Tally()}
    with ThreadPoolExecutor(8) as pool:
        replies = {
            strict: list(
                pool.map(lambda seed, s=strict: request(client, model, seed, s), range(NUM_REQUESTS[opener]))
            )
            for strict in (True, False)
        }
        streams = list(pool.map(lambda seed: streamed(client, model, seed), range(NUM_STREAMED)))
    for strict, tally in tallies.items():
        for reply in replies[strict]:
            choice = reply.choices[0]
            content = choice.message.content or ""
            unparsed = unparsed_openers(content, opener, choice.finish_reason, at_start_only)
            tally.failures += [f"unparsed call in {content!r}"] * unparsed
            tally.attempts += unparsed
            for call in choice.message.tool_calls or []:
                tally.attempts += 1
                why = check_call(call.function.name, call.function.arguments)
                if why:
                    tally.failures.append(why)
                else:
                    tally.valid += 1
    for seed, (content, calls, finish) in enumerate(streams):
        message = replies[True][seed].choices[0].message
        assert content == (message.content or ""), seed
        assert calls == [(c.function.name, c.function.arguments) for c in message.tool_calls or []], seed
        assert finish == replies[True][seed].choices[0].finish_reason
    for strict, tally in tallies.items():
        share = tally.failed / tally.attempts if tally.attempts else 0.0
        print(
            f"{stack.model.name} strict={strict}: {tally.attempts} tool-call attempts in {NUM_REQUESTS[opener]} "
            f"requests, {tally.valid} valid, {tally.failed} not parsed or not schema-valid ({share:.0%})"
        )
    return tallies


def assert_strict_holds(tallies: dict[bool, Tally]) -> None:
    strict, loose = tallies[True], tallies[False]
    assert strict.failures == [], strict.failures[:5]
    assert strict.valid >= 5, "too few tool calls to prove anything"
    assert loose.failed >= 1, "strict off produced no bad call: the test would prove nothing"


def _tiny_qwen3(vocab_size: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=151645,
        )
    )


def _tiny_llama(bos_token_id: int, eos_token_id: int) -> Callable[[int], Any]:
    """A one-layer Llama of a given vocabulary size (for the tokenizers whose ids it needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int) -> Any:
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
            )
        )

    return make


_DEEPSEEK_MARKERS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
)
# family -> (tokenizer, model builder, the pieces its model favours)
FAMILIES: dict[str, tuple[str, Callable[[int], Any], dict[str, float]]] = {
    "qwen3": ("qwen3", _tiny_qwen3, {**COMMON, "<tool_call>": 4.0, "</tool_call>": 2.0, "<|im_end|>": 2.0}),
    # the message is a call when it starts with `{`: make that a likely first token (about one
    # reply in three)
    "llama": (
        "llama3.1",
        _tiny_llama(bos_token_id=128000, eos_token_id=128009),
        {**COMMON, "{": 40.0, "<|eot_id|>": 2.0},
    ),
    # DeepSeek-V3's tokenizer and template on a tiny Llama (the architecture does not matter here)
    "deepseek": (
        "deepseek-v3",
        _tiny_llama(bos_token_id=0, eos_token_id=1),
        {
            **COMMON,
            **{m: 2.0 for m in _DEEPSEEK_MARKERS},
            "function": 2.0,
            "```json": 2.0,
            "<｜tool▁calls▁end｜>": 2.0,
            "<｜end▁of▁sentence｜>": 2.0,
        },
    ),
}


@pytest.fixture(scope="module")
def stacks(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    """One stack per family, each launched as soon as its model is written: the next model is
    crafted while the earlier stacks start."""
    launched: dict[str, Stack] = {}
    try:
        for family, (tokenizer, make, favour) in FAMILIES.items():
            path = craft_model(
                shared_dir, tmp_path_factory.mktemp(f"garbage-{family}"), tokenizer, make, favour
            )
            launched[family] = Stack(tmp_path_factory.mktemp(f"{family}-strict"), path).launch()
        yield {family: stack.wait_ready() for family, stack in launched.items()}
    finally:
        for stack in launched.values():
            stack.stop()


@pytest.fixture(scope="module")
def qwen3_stack(stacks: dict[str, Stack]) -> Stack:
    return stacks["qwen3"]


@pytest.fixture(scope="module")
def llama_stack(stacks: dict[str, Stack]) -> Stack:
    return stacks["llama"]


@pytest.fixture(scope="module")
def deepseek_stack(stacks: dict[str, Stack]) -> Stack:
    return stacks["deepseek"]


def test_hermes_auto_calls_always_parse_when_strict(qwen3_stack: Stack) -> None:
    assert_strict_holds(run_family(qwen3_stack, "<tool_call>", at_start_only=False))


def test_llama3_json_auto_calls_always_parse_when_strict(llama_stack: Stack) -> None:
    assert_strict_holds(run_family(llama_stack, "{", at_start_only=True))


def test_strict_tools_always_needs_no_strict_flag(qwen3_stack: Stack) -> None:
    with qwen3_stack.extra_gateway("gateway-always", ["--strict-tools", "always"]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda seed: request(client, qwen3_stack.model.name, seed, False), range(8))
            )
    calls = [c for r in replies for c in r.choices[0].message.tool_calls or []]
    assert calls and all(check_call(c.function.name, c.function.arguments) == "" for c in calls)
    for reply in replies:
        choice = reply.choices[0]
        assert unparsed_openers(choice.message.content or "", "<tool_call>", choice.finish_reason, False) == 0


def test_strict_calls_with_a_json_answer(qwen3_stack: Stack) -> None:
    """response_format constrains the reply that is not tool calls: a JSON answer, or calls."""
    answer = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    client = openai.OpenAI(base_url=qwen3_stack.base_url, api_key="unused", max_retries=0, timeout=300)

    def one(seed: int) -> Any:
        return client.chat.completions.create(
            model=qwen3_stack.model.name,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=tools(True),  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}},
            temperature=1.0,
            max_tokens=MAX_TOKENS,
            seed=seed,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(16)))
    kinds = set()
    for reply in replies:
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        if message.tool_calls:
            kinds.add("calls")
            assert all(check_call(c.function.name, c.function.arguments) == "" for c in message.tool_calls)
            rest = (message.content or "").strip()  # nothing, or a further call cut by max_tokens
            assert not rest or (finish == "length" and rest.startswith("<tool_call>")), rest
        elif finish != "length":
            kinds.add("answer")
            jsonschema.validate(json.loads(message.content or ""), answer)
    print(f"strict calls with a JSON answer: replies were {sorted(kinds)}")
    assert kinds, "every reply was cut by max_tokens"


def test_a_regex_cannot_join_strict_calls(qwen3_stack: Stack) -> None:
    reply = httpx.post(
        qwen3_stack.base_url + "/chat/completions",
        json={"messages": MESSAGES, "tools": tools(True), "guided_regex": "[a-z]+", "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "guided_regex"
    # two tools that define one $defs name differently cannot share the grammar's schema
    clash = tools(True)
    clash[0]["function"]["parameters"] = {**WEATHER, "$defs": {"x": {"type": "string"}}}
    clash[1]["function"]["parameters"] = {**ADD, "$defs": {"x": {"type": "integer"}}}
    reply = httpx.post(
        qwen3_stack.base_url + "/chat/completions",
        json={"messages": MESSAGES, "tools": clash, "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "tools[1].function.parameters.$defs.x"


def test_llama3_json_refuses_a_json_answer_with_strict_calls(llama_stack: Stack) -> None:
    reply = httpx.post(
        llama_stack.base_url + "/chat/completions",
        json={"messages": MESSAGES, "tools": tools(True), "response_format": {"type": "json_object"}},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "response_format"


def test_deepseek_v3_auto_calls_always_parse_when_strict(deepseek_stack: Stack) -> None:
    assert_strict_holds(run_family(deepseek_stack, "<｜tool▁call▁begin｜>", at_start_only=False))
