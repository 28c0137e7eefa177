"""Constants and helpers of the tiny LLaVA tests (conftest.py builds the model directory and
starts the stack the API tests share)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_TOKEN = 512  # "<image>", added after stories260K's 512 tokens
VOCAB = 513
IMAGE_SIZE = 42  # 3 x 3 patches of 14: 9 image tokens per image ("default": the CLS row dropped)
TOKENS_PER_IMAGE = 9
MAX_TOKENS = 8  # of the API tests' greedy answers

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tokenizer_files(stories_dir: Path, path: Path) -> None:
    """stories260K's tokenizer plus an "<image>" token (id IMAGE_TOKEN), CHAT_TEMPLATE, and a
    processor_config.json naming the image token, into the model directory `path`."""
    tok = json.loads((stories_dir / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {"id": IMAGE_TOKEN, "content": "<image>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(tok))
    tok_cfg = json.loads((stories_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    shutil.copy(stories_dir / "special_tokens_map.json", path / "special_tokens_map.json")
    (path / "processor_config.json").write_text(json.dumps({"image_token": "<image>"}))


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def hundred_megapixels() -> bytes:
    """A 10,000 x 10,000 PNG: a small file that decodes past every pixel limit (built once)."""
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes, detail: str = "auto") -> dict[str, Any]:
    """A chat completion's `image_url` content part carrying `data` as a data: URL."""
    return {"type": "image_url", "image_url": {"url": data_url(data), "detail": detail}}


def chat(client: Any, parts: list[dict[str, Any]]) -> Any:
    """A greedy chat completion (an `openai.OpenAI` client) of one user message of `parts`."""
    return client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": parts}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )


@contextmanager
def image_server(image: bytes) -> Iterator[str]:
    """A local HTTP server serving `image` as a PNG; yields its URL on host `localhost` (the
    stack's --allowed-media-domains)."""

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
        yield f"http://localhost:{server.server_address[1]}/cat.png"
    finally:
        server.shutdown()
        server.server_close()
