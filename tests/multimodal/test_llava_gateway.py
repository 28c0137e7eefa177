"""Image chats through the real stack (styler, CPU worker, gateway) with the openai client: the
answer equals transformers' greedy generate on the same rendered prompt and pixels; bad images are
400s naming the part, and requests next to them are unaffected."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from gateway_stack import Stack
from llava_testlib import (
    IMAGE_TOKEN,
    MAX_TOKENS,
    TOKENS_PER_IMAGE,
    chat,
    data_url,
    hundred_megapixels,
    image_part,
    image_server,
    png,
)

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def client(llava_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=llava_stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(llava_dir: Path) -> tuple[Any, Any, Any, dict[Any, str]]:
    """transformers' model, tokenizer and image processor, and the answers computed so far."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32).eval()
    return (
        model,
        AutoTokenizer.from_pretrained(str(llava_dir)),
        CLIPImageProcessorPil.from_pretrained(str(llava_dir)),
        {},
    )


def _expected(hf: tuple[Any, Any, Any, dict[Any, str]], text_parts: list[str], images: list[bytes]) -> str:
    """transformers' greedy answer: the template's prompt with each "<image>" expanded (each
    distinct question computed once per module: several tests ask the same one)."""
    answers = hf[3]
    key = (tuple(text_parts), tuple(images))
    if key not in answers:
        answers[key] = _generate(hf, text_parts, images)
    return answers[key]


def _generate(hf: tuple[Any, Any, Any, dict[Any, str]], text_parts: list[str], images: list[bytes]) -> str:
    from PIL import Image

    model, tok, proc, _ = hf
    content = [{"type": "text", "text": t} for t in text_parts]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = []
    for t in tok(prompt, add_special_tokens=False)["input_ids"]:
        ids += [t] * (TOKENS_PER_IMAGE if t == IMAGE_TOKEN else 1)
    kwargs = {}
    if images:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        kwargs["pixel_values"] = torch.from_numpy(proc(images=pil, return_tensors="np")["pixel_values"])
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    new = [t for t in out[0, len(ids) :].tolist() if t != 2]
    full = tok.decode(ids + new, skip_special_tokens=True)
    return str(full[len(tok.decode(ids, skip_special_tokens=True)) :])


def _chat(client: openai.OpenAI, parts: list[dict[str, Any]]) -> str:
    return chat(client, parts).choices[0].message.content or ""


def test_image_chats_match_transformers(
    client: openai.OpenAI, hf: tuple[Any, Any, Any, dict[Any, str]]
) -> None:
    a, b = png(64, 48, seed=1), png(30, 90, seed=2)
    one = [{"type": "text", "text": "look "}, image_part(a), {"type": "text", "text": " what"}]
    assert _chat(client, one) == _expected(hf, ["look ", "<image>", " what"], [a])
    two = [image_part(b, "low"), {"type": "text", "text": " and "}, image_part(a, "high")]
    assert _chat(client, two) == _expected(hf, ["<image>", " and ", "<image>"], [b, a])
    none = [{"type": "text", "text": "just text"}]
    assert _chat(client, none) == _expected(hf, ["just text"], [])


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (image_part(png(20, 20, seed=3)[:40]), "not a decodable image"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}},
            "not a decodable",
        ),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not allowed"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/cat.png"}}, "data: URL or an http"),
        ({"type": "image_url", "image_url": {"url": data_url(b"x"), "detail": "huge"}}, "detail"),
    ],
)
def test_bad_images_are_400s_naming_the_part(
    client: openai.OpenAI, hf: tuple[Any, Any, Any, dict[Any, str]], part: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [{"type": "text", "text": "hi "}, part])
    assert message in str(info.value)
    assert info.value.body["param"].startswith("messages[0].content[1]")  # type: ignore[index]
    none = [{"type": "text", "text": "still fine"}]
    assert _chat(client, none) == _expected(hf, ["still fine"], [])


def test_too_many_images_is_a_400(client: openai.OpenAI) -> None:
    tiny = image_part(png(4, 4, seed=0))
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [tiny] * 17)
    assert info.value.body["param"] == "messages[0].content[16]"  # type: ignore[index]


def test_hundred_megapixel_image_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [image_part(hundred_megapixels())])
    assert "pixels" in str(info.value)
    assert info.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]


def test_allowed_domain_url_is_fetched(
    client: openai.OpenAI, hf: tuple[Any, Any, Any, dict[Any, str]]
) -> None:
    image = png(50, 40, seed=4)
    with image_server(image) as url:
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " cat"}]
        assert _chat(client, parts) == _expected(hf, ["<image>", " cat"], [image])
