"""`tandem up --model DIR` on a tiny random gpt-oss (transformers' GptOssConfig, saved) with the
real gpt-oss chat template and a stand-in tokenizer carrying harmony's special tokens
(tests/styler/harmony_data.py: o200k_harmony itself is not available offline), driven by the
openai client: chat with tools renders through the template (the prompt is exactly transformers'
apply_chat_template), the harmony parsers are picked automatically, streaming and non-streaming
answers agree, and the greedy tokens are transformers' own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.styler.parsers.harmony import HARMONY_MARKERS, HarmonyParser
from tests.e2e.stack import UpProcess
from tests.styler.harmony_data import write_harmony_tokenizer
from tests.worker.worker_testlib import _tiny_gpt_oss

pytestmark = pytest.mark.e2e

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Zürich?"},
]


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt-oss-up")
    torch.manual_seed(0)
    model = _tiny_gpt_oss()
    ids = write_harmony_tokenizer(path)
    model.config.max_position_embeddings = 1024  # the byte-level prompt is ~530 tokens
    model.config.eos_token_id = ids["<|return|>"]
    model.config.bos_token_id = ids["<|startoftext|>"]
    model.generation_config.eos_token_id = [ids["<|return|>"], ids["<|endoftext|>"]]
    model.save_pretrained(str(path))
    return path


def test_chat_with_tools_through_tandem_up(gpt_oss_dir: Path) -> None:
    up = UpProcess(gpt_oss_dir)  # starts while transformers computes the reference below
    try:
        _check_chat_with_tools(up, gpt_oss_dir)
    finally:
        status = up.stop()
    assert status == 0, up.output()[-3000:]


def _check_chat_with_tools(up: UpProcess, gpt_oss_dir: Path) -> None:
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gpt_oss_dir))
    prompt_ids = tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    hf = AutoModelForCausalLM.from_pretrained(str(gpt_oss_dir), dtype=torch.float32).eval()
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    out = hf.generate(
        torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, eos_token_id=stop_ids, pad_token_id=0
    )
    want_ids = out[0, len(prompt_ids) :].tolist()

    # what the harmony parsers make of transformers' output (reasoning, content, calls)
    # (the stream keeps harmony's markers and skips the other special tokens)
    markers = {tokenizer.convert_tokens_to_ids(m) for m in HARMONY_MARKERS}
    kept = [i for i in want_ids if i in markers or i not in tokenizer.all_special_ids]
    parser = HarmonyParser("harmony", reasoning=True, tools=True)
    expected = parser.feed(tokenizer.decode(kept, skip_special_tokens=False))
    expected.extend(parser.finish())
    up.wait_healthy()
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    # the raw completion of the rendered prompt's ids: transformers' tokens, as text
    completion = client.completions.create(model=model, prompt=prompt_ids, max_tokens=12, temperature=0.0)
    assert completion.usage is not None and completion.usage.completion_tokens == len(want_ids)
    assert completion.choices[0].text == tokenizer.decode(want_ids, skip_special_tokens=True)
    # chat: the styler renders the same prompt and parses the same output
    args: dict[str, Any] = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0.0)
    reply = client.chat.completions.create(**args)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(want_ids)
    message = reply.choices[0].message
    assert (getattr(message, "reasoning_content", None) or "") == expected.reasoning
    assert (message.content or "") == expected.content
    assert [c.function.name for c in message.tool_calls or []] == [c.name for c in expected.tool_calls]
    streamed = "".join(
        (chunk.choices[0].delta.content or "")
        for chunk in client.chat.completions.create(**args, stream=True)
        if chunk.choices
    )
    assert streamed == (message.content or "")
    # OpenAI's reasoning_effort reaches the template ("Reasoning: high" in the system message)
    high = tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, reasoning_effort="high", return_dict=False
    )
    assert len(high) == len(prompt_ids) - 2  # byte tokens: the default "medium" became "high"
    effort = client.chat.completions.create(**{**args, "max_tokens": 1}, reasoning_effort="high")
    assert effort.usage is not None and effort.usage.prompt_tokens == len(high)
