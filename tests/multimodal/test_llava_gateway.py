"""Image chats through the real stack (styler, CPU worker, gateway) with the openai client: the
answer equals transformers' greedy generate on the same rendered prompt and pixels; bad images are
400s naming the part, and requests next to them are unaffected."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from gateway_stack import Stack
from llava_testlib import IMAGE_TOKEN, TOKENS_PER_IMAGE, data_url, png

pytestmark = [pytest.mark.e2e]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def stack(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("mm-stack"), llava_dir, gateway_args=["--allowed-media-domains", "localhost"]
    )
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(llava_dir: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32).eval()
    return (
        model,
        AutoTokenizer.from_pretrained(str(llava_dir)),
        CLIPImageProcessorPil.from_pretrained(str(llava_dir)),
    )


def _expected(hf: tuple[Any, Any, Any], text_parts: list[str], images: list[bytes]) -> str:
    """transformers' greedy answer: the template's prompt with each "<image>" expanded."""
    import io

    from PIL import Image

    model, tok, proc = hf
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
    reply = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item,misc]
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    return reply.choices[0].message.content or ""


def _image(data: bytes, detail: str = "auto") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(data), "detail": detail}}


def test_image_chats_match_transformers(client: openai.OpenAI, hf: tuple[Any, Any, Any]) -> None:
    a, b = png(64, 48, seed=1), png(30, 90, seed=2)
    one = [{"type": "text", "text": "look "}, _image(a), {"type": "text", "text": " what"}]
    assert _chat(client, one) == _expected(hf, ["look ", "<image>", " what"], [a])
    two = [_image(b, "low"), {"type": "text", "text": " and "}, _image(a, "high")]
    assert _chat(client, two) == _expected(hf, ["<image>", " and ", "<image>"], [b, a])
    none = [{"type": "text", "text": "just text"}]
    assert _chat(client, none) == _expected(hf, ["just text"], [])


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (_image(png(20, 20, seed=3)[:40]), "not a decodable image"),
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
    client: openai.OpenAI, hf: tuple[Any, Any, Any], part: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [{"type": "text", "text": "hi "}, part])
    assert message in str(info.value)
    assert info.value.body["param"].startswith("messages[0].content[1]")  # type: ignore[index]
    none = [{"type": "text", "text": "still fine"}]
    assert _chat(client, none) == _expected(hf, ["still fine"], [])


def test_too_many_images_is_a_400(client: openai.OpenAI) -> None:
    tiny = _image(png(4, 4, seed=0))
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [tiny] * 17)
    assert info.value.body["param"] == "messages[0].content[16]"  # type: ignore[index]


def test_hundred_megapixel_image_is_a_400(client: openai.OpenAI) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, [_image(buf.getvalue())])
    assert "pixels" in str(info.value)
    assert info.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]


def test_allowed_domain_url_is_fetched(client: openai.OpenAI, hf: tuple[Any, Any, Any]) -> None:
    image = png(50, 40, seed=4)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://localhost:{server.server_address[1]}/cat.png"
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " cat"}]
        assert _chat(client, parts) == _expected(hf, ["<image>", " cat"], [image])
    finally:
        server.shutdown()
        server.server_close()
