"""Images through the Responses and Anthropic Messages APIs on the real stack (styler, CPU worker,
gateway) with the official `openai` and `anthropic` SDKs: an `input_image` part and an `image`
block give the same greedy tokens as the equivalent chat completion with the same image, whole
and streamed; bad images are 400s in each API's own envelope naming the part, and the next
request is unaffected."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from gateway_stack import Stack
from llava_testlib import MAX_TOKENS, chat, data_url, hundred_megapixels, image_server, png

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def oai(llava_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=llava_stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(llava_stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=llava_stack.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served_image() -> Iterator[tuple[str, bytes]]:
    """A PNG and its URL on a local HTTP server (host `localhost`, allowed by the stack)."""
    image = png(50, 40, seed=4)
    with image_server(image) as url:
        yield url, image


# A message is a list of ("text", str) and ("image", bytes | url) items, written in each API's form.
Item = tuple[str, Any]


def _url(value: bytes | str) -> str:
    return value if isinstance(value, str) else data_url(value)


def _chat(oai: openai.OpenAI, items: list[Item]) -> tuple[str, int, int]:
    parts = [
        {"type": "text", "text": v} if k == "text" else {"type": "image_url", "image_url": {"url": _url(v)}}
        for k, v in items
    ]
    reply = chat(oai, parts)
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens, reply.usage.completion_tokens


def _responses_input(items: list[Item], detail: str = "auto") -> list[Any]:
    content = [
        {"type": "input_text", "text": v}
        if k == "text"
        else {"type": "input_image", "image_url": _url(v), "detail": detail}
        for k, v in items
    ]
    return [{"role": "user", "content": content}]


def _anthropic_content(items: list[Item]) -> list[Any]:
    blocks: list[Any] = []
    for k, v in items:
        if k == "text":
            blocks.append({"type": "text", "text": v})
        elif isinstance(v, str):
            blocks.append({"type": "image", "source": {"type": "url", "url": v}})
        else:
            data = base64.b64encode(v).decode()
            blocks.append(
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
            )
    return blocks


def _response(oai: openai.OpenAI, items: list[Item], **kwargs: Any) -> Any:
    return oai.responses.create(
        model="", input=_responses_input(items), max_output_tokens=MAX_TOKENS, temperature=0.0, **kwargs
    )


def _message(claude: anthropic.Anthropic, items: list[Item], **kwargs: Any) -> Any:
    return claude.messages.create(
        **kwargs,
        model="",
        max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0.0},  # not in the SDK's current signature; tandem takes it
        messages=[{"role": "user", "content": _anthropic_content(items)}],
    )


CASES: list[list[Item]] = [
    [("text", "look "), ("image", png(64, 48, seed=1)), ("text", " what")],
    [("image", png(30, 90, seed=2)), ("text", " and "), ("image", png(64, 48, seed=1))],
]


@pytest.mark.parametrize("items", CASES)
def test_responses_and_messages_match_chat(
    oai: openai.OpenAI, claude: anthropic.Anthropic, items: list[Item]
) -> None:
    text, prompt_tokens, completion_tokens = _chat(oai, items)
    assert text and completion_tokens > 0

    response = _response(oai, items)
    assert response.output_text == text
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt_tokens, completion_tokens)
    low = oai.responses.create(
        model="", input=_responses_input(items, "low"), max_output_tokens=MAX_TOKENS, temperature=0.0
    )
    assert low.output_text == text  # `detail` changes nothing: the processor fixes the size

    message = _message(claude, items)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == text
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt_tokens, completion_tokens)
    count = claude.messages.count_tokens(
        model="", messages=[{"role": "user", "content": _anthropic_content(items)}]
    )
    assert count.input_tokens == prompt_tokens


def test_streams_match_chat(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    items = CASES[0]
    text, _, _ = _chat(oai, items)

    deltas = []
    final = None
    for event in oai.responses.create(
        model="", input=_responses_input(items), max_output_tokens=MAX_TOKENS, temperature=0.0, stream=True
    ):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert "".join(deltas) == text and final is not None and final.output_text == text

    with claude.messages.stream(
        model="",
        max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0.0},  # not in the SDK's current signature; tandem takes it
        messages=[{"role": "user", "content": _anthropic_content(items)}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        assert stream.get_final_message().content[0].text == text  # type: ignore[union-attr]
    assert streamed == text


def test_allowed_url_images(
    oai: openai.OpenAI, claude: anthropic.Anthropic, served_image: tuple[str, bytes]
) -> None:
    url, image = served_image
    text, _, _ = _chat(oai, [("image", image), ("text", " cat")])
    assert _response(oai, [("image", url), ("text", " cat")]).output_text == text
    assert _message(claude, [("image", url), ("text", " cat")]).content[0].text == text


def test_an_image_in_a_stored_conversation(oai: openai.OpenAI) -> None:
    """The conversation `previous_response_id` continues keeps its image."""
    items: list[Item] = [("text", "look "), ("image", png(64, 48, seed=1))]
    first = _response(oai, items)
    second = oai.responses.create(
        model="", previous_response_id=first.id, input="more", max_output_tokens=MAX_TOKENS, temperature=0.0
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


# (the image, a word of the message); the image is the second part / block of the first message
BAD_IMAGES: list[tuple[Any, str]] = [
    (png(20, 20, seed=3)[:40], "not a decodable image"),  # truncated PNG
    (b"hello world", "not a decodable"),  # not an image
    (hundred_megapixels(), "pixels"),
    ("https://example.com/cat.png", "not allowed"),  # host not in --allowed-media-domains
]


@pytest.mark.parametrize(("image", "word"), BAD_IMAGES)
def test_bad_images_are_responses_400s(oai: openai.OpenAI, image: Any, word: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        # the instructions are chat's messages[0]: the part is still named by its input item
        _response(oai, [("text", "hi "), ("image", image)], instructions="Be brief.")
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "input[0].content[1]", body
    assert word in body["message"] and "messages[" not in body["message"]
    assert _response(oai, [("text", "still fine")]).output_text == _chat(oai, [("text", "still fine")])[0]


@pytest.mark.parametrize(("image", "word"), BAD_IMAGES)
def test_bad_images_are_anthropic_400s(claude: anthropic.Anthropic, image: Any, word: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        _message(claude, [("text", "hi "), ("image", image)], system="Be brief.")  # chat's messages[0]
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert word in message and "messages.0.content.1.source" in message and "messages[" not in message
    assert _message(claude, [("text", "still fine")]).content[0].text  # the next request is served


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_image", "file_id": "file-abc", "detail": "auto"}, "input[0].content[0].file_id"),
        ({"type": "input_image", "image_url": "ftp://example.com/a.png"}, "input[0].content[0]"),
        (
            {"type": "input_image", "image_url": data_url(b"x"), "detail": "huge"},
            "input[0].content[0].detail",
        ),
        ({"type": "input_image"}, "input[0].content[0].image_url"),
    ],
)
def test_malformed_input_image_parts(oai: openai.OpenAI, part: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(
            model="",
            input=[{"role": "user", "content": [part]}],
            max_output_tokens=MAX_TOKENS,  # type: ignore[list-item]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"type": "file", "file_id": "file_abc"}, "messages.0.content.0.source"),
        (
            {"type": "base64", "media_type": "image/bmp", "data": "AAAA"},
            "messages.0.content.0.source.media_type",
        ),
        ({"type": "base64", "media_type": "image/png", "data": "%%%"}, "messages.0.content.0.source"),
        ({"type": "url", "url": "ftp://example.com/a.png"}, "messages.0.content.0.source.url"),
        ({"type": "bytes"}, "messages.0.content.0.source.type"),
    ],
)
def test_malformed_image_blocks(claude: anthropic.Anthropic, source: dict[str, Any], field: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model="",
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image", "source": source}]}],  # type: ignore[typeddict-item]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert field in body["error"]["message"], body


def test_too_many_images(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    tiny = png(4, 4, seed=0)
    with pytest.raises(openai.BadRequestError) as info:
        _response(oai, [("image", tiny)] * 17)
    assert info.value.body["param"] == "input[0].content[16]"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        _message(claude, [("image", tiny)] * 17)
    assert "messages.0.content.16.source" in ainfo.value.body["error"]["message"]  # type: ignore[index]
