"""The encode role below the gateway: an encode worker's VisionEncoder (vision side only, loaded
from the checkpoint) gives the rows the worker computes in process; those rows, sent over the
wire, give the worker the same greedy tokens as transformers; forged or malformed rows are
refused naming the field. (Through `tandem up --encode-workers 1`: test_qwen2_5_vl_up.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from llava_testlib import png
from qwen_testlib import (
    chat_messages,
    engine_request,
    hf_answer,
    hf_processor,
)

from services.styler.images import ClipPreprocessor, decode_image
from services.styler.styler import RenderInput, Styler, StylerOptions
from services.worker.config import WorkerConfig
from services.worker.encoder import VisionEncoder
from services.worker.engine import Engine
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import ImageInput, image_to_pb, images_from_pb
from services.worker.request import EngineRequest

CONVERSATIONS: list[list[str | bytes]] = [
    ["Two: ", png(120, 40, seed=5), " and ", png(50, 70, seed=6)],
    ["No image in this one."],
    [png(90, 90, seed=7), " one"],
]


@pytest.fixture(scope="module")
def styler(qwen_vl_dir: Path) -> Any:
    s = Styler.load(StylerOptions(model=str(qwen_vl_dir), render_processes=1))
    yield s
    s.close()


def test_encode_worker_rows_give_transformers_tokens(qwen_vl_dir: Path, styler: Styler) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    encoder = VisionEncoder(WorkerConfig(model=str(qwen_vl_dir), device="cpu", role="encode"))
    assert all(name.startswith("visual.") for name in encoder.params)  # no language-model weights
    engine = Engine(WorkerConfig(model=str(qwen_vl_dir), device="cpu", kv_cache_memory="8MiB"))
    requests = []
    for k, conversation in enumerate(CONVERSATIONS):
        rendered = styler.render(RenderInput(messages=chat_messages(conversation)[0]))  # type: ignore[arg-type]
        req = engine_request(f"e{k}", rendered)
        images = images_from_pb([image_to_pb(image) for image in encoder.encode(req.images)])  # the wire
        for image, embedded in zip(req.images, images, strict=True):
            assert embedded.embeds is not None and embedded.pixel_values.numel() == 0
            assert torch.equal(embedded.embeds, engine.runner.model.encode_image(image))  # type: ignore[operator]
        requests.append(EngineRequest(req.request_id, req.prompt_token_ids, req.sampling, images=images))
    results = engine.run(requests)
    assert engine.runner.encoder_cache.misses == 0  # the worker never ran its own encoder
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_vl_dir), dtype=torch.float32).eval()
    processor = hf_processor(qwen_vl_dir)
    for conversation, result in zip(CONVERSATIONS, results, strict=True):
        assert result.token_ids[0] == hf_answer(hf, processor, conversation)[0]
    rendered = styler.render(RenderInput(messages=chat_messages(CONVERSATIONS[2])[0]))  # type: ignore[arg-type]
    encoder.encode(engine_request("again", rendered).images)
    assert (encoder.cache.misses, encoder.cache.hits) == (3, 1)  # the encode worker's own encoder cache


def test_llava_encode_worker_rows(llava_dir: Path) -> None:
    encoder = VisionEncoder(WorkerConfig(model=str(llava_dir), device="cpu", role="encode"))
    engine = Engine(WorkerConfig(model=str(llava_dir), device="cpu", kv_cache_memory="4MiB"))
    pv = ClipPreprocessor.from_model_dir(str(llava_dir))(decode_image(png(64, 48, seed=3)))
    image = ImageInput(pv.hash, 1, 9, torch.from_numpy(pv.array))
    (embedded,) = encoder.encode((image,))
    assert embedded.embeds is not None
    assert torch.equal(embedded.embeds, engine.runner.model.encode_image(image))  # type: ignore[operator]


def test_bad_rows_are_refused(qwen_vl_dir: Path, styler: Styler) -> None:
    encoder = VisionEncoder(WorkerConfig(model=str(qwen_vl_dir), device="cpu", role="encode"))
    rendered = styler.render(RenderInput(messages=chat_messages(CONVERSATIONS[2])[0]))  # type: ignore[arg-type]
    req = engine_request("b", rendered)
    (good,) = [image_to_pb(image) for image in encoder.encode(req.images)]
    forged = type(good)()
    forged.CopyFrom(good)
    forged.embeddings = bytes(len(good.embeddings))  # other rows under the same hash
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.hash"):
        images_from_pb([forged])
    short = type(good)()
    short.CopyFrom(good)
    short.embeddings = good.embeddings[:-4]
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.embeddings"):
        images_from_pb([short])
    odd = type(good)()
    odd.CopyFrom(good)
    odd.embeddings_dtype = "int8"
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.embeddings_dtype"):
        images_from_pb([odd])
    (image,) = images_from_pb([good])
    assert image.embeds is not None
    narrow = ImageInput(
        image.hash, image.offset, image.length, image.pixel_values, image.grid_thw, image.embeds[:, :8]
    )
    engine = Engine(WorkerConfig(model=str(qwen_vl_dir), device="cpu", kv_cache_memory="8MiB"))
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.embeddings_shape"):
        engine.add_request(EngineRequest("n", req.prompt_token_ids, images=(narrow,)))
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.embeddings"):
        encoder.encode((image,))  # already encoded


def test_up_starts_encode_workers_for_the_gateway(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from services.common.config import parse_config
    from tandem.up import UpConfig, build_children

    _styler, worker, *encoders, gateway = build_children(
        UpConfig(model=str(tmp_path), encode_workers=2, served_model_name="vl"), tmp_path
    )
    assert [c.name for c in encoders] == ["encode-worker-0", "encode-worker-1"]
    addresses = []
    for child in encoders:
        parsed = parse_config(
            WorkerConfig, child.argv[child.argv.index("worker") + 1 :], "tandem worker", env={}
        )
        assert parsed.role == "encode" and parsed.served_model_name == "vl"
        addresses.append(parsed.address)
    options = parse_config(
        GatewayConfig, gateway.argv[gateway.argv.index("gateway") + 1 :], "tandem gateway", env={}
    )
    assert options.encode_worker == addresses and len(options.worker) == 1
    assert "--role" not in worker.argv
    with pytest.raises(ValueError, match="--encode-workers must be >= 0"):
        UpConfig(model=str(tmp_path), encode_workers=-1)


async def test_gateway_skips_a_gone_encode_worker(tmp_path: Path) -> None:
    """Every encode worker gone: each is tried once (by the image's hash, then the next), then the
    request is a 503 with Retry-After, not a 5xx from an exception."""
    from gateway.encoder_pool import EncoderPool
    from gateway.errors import APIError
    from tandem.v1 import common_pb2

    pool = EncoderPool([f"unix:{tmp_path / 'a.sock'}", f"unix:{tmp_path / 'b.sock'}"])
    try:
        with pytest.raises(APIError) as info:
            await pool.encode("r", [common_pb2.ImageInput(hash="ab" * 32)])
        assert info.value.status == 503 and info.value.retry_after_s == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_round_trip_in_each_dtype(dtype: torch.dtype) -> None:
    from services.worker.mm_inputs import with_embeddings

    rows = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    image = with_embeddings(ImageInput("", 3, 6, torch.zeros(24, 1176), (1, 6, 4)), rows)
    (back,) = images_from_pb([image_to_pb(image)])
    assert back.embeds is not None and back.embeds.dtype == dtype and torch.equal(back.embeds, rows)
    assert (back.hash, back.offset, back.length, back.grid_thw) == (image.hash, 3, 6, (1, 6, 4))
