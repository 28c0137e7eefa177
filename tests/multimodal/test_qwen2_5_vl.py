"""Qwen2.5-VL below the gateway: the styler's token ids and pixels equal transformers' processor's,
M-RoPE positions equal `get_rope_index`, and the worker's greedy tokens for prompts with zero,
one and two images (several sizes and aspect ratios, one batch with text-only requests) equal
transformers' generate in fp32 on the CPU; different images never share KV, and a repeated image
comes from the encoder cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from llava_testlib import png
from qwen_testlib import (
    IMAGE_PAD,
    chat_messages,
    engine_request,
    hf_answer,
    hf_inputs,
    hf_processor,
)

from services.styler.styler import RenderInput, Styler, StylerOptions
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import ImageInput
from services.worker.model_config import load_model_config
from services.worker.mrope import image_positions, rope_images, text_positions
from services.worker.request import EngineRequest

SIZES = [(60, 90), (200, 50), (30, 30), (300, 200), (90, 60)]  # width x height


@pytest.fixture(scope="module")
def hf_model(qwen_vl_dir: Path) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_vl_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(qwen_vl_dir: Path) -> Any:
    return hf_processor(qwen_vl_dir)


@pytest.fixture(scope="module")
def styler(qwen_vl_dir: Path) -> Any:
    s = Styler.load(StylerOptions(model=str(qwen_vl_dir), render_processes=1))
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(qwen_vl_dir: Path) -> Engine:
    return Engine(WorkerConfig(model=str(qwen_vl_dir), device="cpu", kv_cache_memory="8MiB", max_num_seqs=8))


CONVERSATIONS: list[list[str | bytes]] = [
    ["What is this? ", png(*SIZES[0], seed=0)],
    ["Just text, no picture at all."],
    [png(*SIZES[1], seed=1), " versus ", png(*SIZES[2], seed=2), " which one?"],
    ["Describe ", png(*SIZES[3], seed=3), " in a few words please, then more."],
    ["A longer text-only prompt that sits in the same batch as the image ones."],
    [png(*SIZES[4], seed=4)],
]


def test_ids_and_pixels_equal_transformers_processor(styler: Styler, processor: Any) -> None:
    for conversation in CONVERSATIONS:
        ours_msgs, hf_msgs, images = chat_messages(conversation)
        rendered = styler.render(RenderInput(messages=ours_msgs))  # type: ignore[arg-type]
        expected = hf_inputs(processor, hf_msgs, images)
        assert rendered.token_ids == expected["input_ids"][0].tolist()
        if images:
            pixels = np.concatenate([im.pixels.array for im in rendered.images])
            assert pixels.dtype == np.float32
            assert np.array_equal(pixels, expected["pixel_values"].numpy())
            assert [list(im.pixels.grid_thw) for im in rendered.images] == expected["image_grid_thw"].tolist()
            mask = expected["mm_token_type_ids"][0].tolist()
            spans = [(im.offset, im.length) for im in rendered.images]
            assert [i for i, t in enumerate(mask) if t == 1] == [o + k for o, n in spans for k in range(n)]


def test_mrope_positions_equal_get_rope_index(hf_model: Any, styler: Styler, processor: Any) -> None:
    """Our positions (text: shifted 1D; image tokens: (t, h, w)) are transformers'
    `get_rope_index`, for the prompt and the generated tokens after it (`rope_deltas`)."""
    for conversation in CONVERSATIONS:
        ours_msgs, hf_msgs, images = chat_messages(conversation)
        rendered = styler.render(RenderInput(messages=ours_msgs))  # type: ignore[arg-type]
        if not images:
            continue
        inputs = hf_inputs(processor, hf_msgs, images)
        expected, deltas = hf_model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        req = engine_request("p", rendered)
        n = len(rendered.token_ids)
        ours = torch.tensor(text_positions(req.images, 2, 0, n + 3)).repeat(3, 1)
        layout, _ = rope_images(req.images, 2)
        for image in layout:
            ours[:, image.offset : image.end] = torch.tensor(image_positions(image, image.offset, image.end))
        assert torch.equal(ours[:, :n], expected[:, 0])
        assert ours[0, n:].tolist() == [n + k + int(deltas[0, 0]) for k in range(3)]
        # a chunk starting anywhere gives the same positions (an image token's 1D one is its
        # temporal position: its rows come from image_positions)
        for start in (5, layout[0].offset + 1, layout[-1].end):
            assert text_positions(req.images, 2, start, n + 2) == ours[0, start : n + 2].tolist()


@pytest.mark.parametrize("budget", [2048, 24])
def test_greedy_with_images_matches_transformers(
    qwen_vl_dir: Path, hf_model: Any, processor: Any, styler: Styler, budget: int
) -> None:
    engine = Engine(
        WorkerConfig(
            model=str(qwen_vl_dir),
            device="cpu",
            kv_cache_memory="8MiB",
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            enable_prefix_caching=False,
        )
    )
    rendered = [styler.render(RenderInput(messages=chat_messages(c)[0])) for c in CONVERSATIONS]  # type: ignore[arg-type]
    results = engine.run([engine_request(f"r{k}", r) for k, r in enumerate(rendered)])
    for conversation, result in zip(CONVERSATIONS, results, strict=True):
        assert result.error is None
        assert result.token_ids[0] == hf_answer(hf_model, processor, conversation)[0]
    assert engine.block_manager.num_used_blocks == 0


def test_same_tokens_different_images_never_share_kv(
    engine: Engine, hf_model: Any, processor: Any, styler: Styler
) -> None:
    """Two images of the same size give equal token ids: the second must not reuse the first's
    cached blocks; the first again does, and its embeddings come from the encoder cache."""
    a, b = png(84, 84, seed=10), png(84, 84, seed=11)
    conversations: list[list[str | bytes]] = [[c, " what is it, in detail?"] for c in (a, b, a)]
    cache = engine.runner.encoder_cache
    misses = cache.misses
    for k, conversation in enumerate(conversations):
        rendered = styler.render(RenderInput(messages=chat_messages(conversation)[0]))  # type: ignore[arg-type]
        (result,) = engine.run([engine_request(f"s{k}", rendered)])
        assert result.token_ids[0] == hf_answer(hf_model, processor, conversation)[0]
        bs = engine.config.block_size
        cached = result.usage.cached_prompt_tokens if result.usage else -1
        assert cached == (0 if k < 2 else (len(rendered.token_ids) - 1) // bs * bs)
    assert cache.misses - misses == 2


def test_bad_grids_and_spans_are_refused(engine: Engine, styler: Styler) -> None:
    rendered = styler.render(RenderInput(messages=chat_messages(["x ", png(60, 90, seed=0)])[0]))  # type: ignore[arg-type]
    (image,) = engine_request("x", rendered).images
    prompt = tuple(rendered.token_ids)
    cases = [
        (
            ImageInput(image.hash, image.offset, image.length - 1, image.pixel_values, image.grid_thw),
            "length",
        ),
        (ImageInput(image.hash, image.offset, image.length, image.pixel_values, (1, 4, 4)), "length"),
        (ImageInput(image.hash, image.offset, image.length, image.pixel_values, (1, 3, 8)), "grid_thw"),
        (ImageInput(image.hash, image.offset, image.length, image.pixel_values, (2, 6, 2)), "grid_thw"),
        (
            ImageInput(image.hash, image.offset, image.length, image.pixel_values[:, :10], image.grid_thw),
            "shape",
        ),
    ]
    for k, (bad, field) in enumerate(cases):
        with pytest.raises(InvalidRequestError, match=rf"images\[0\]\.{field}"):
            engine.add_request(EngineRequest(f"bad{k}", prompt, images=(bad,)))
    assert not engine.has_unfinished()


def test_image_pad_in_the_text_is_refused(styler: Styler) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        styler.render(RenderInput(messages=chat_messages(["<|image_pad|> ", png(60, 90, seed=0)])[0]))  # type: ignore[arg-type]
    assert IMAGE_PAD in styler.render(RenderInput(messages=chat_messages([png(60, 90, seed=0)])[0])).token_ids  # type: ignore[arg-type]


def test_hub_layout_config(tmp_path: Path, qwen_vl_dir: Path) -> None:
    """The hub's Qwen2.5-VL config.json: language-model fields at the top level and
    `rope_scaling: {"type": "mrope", ...}` (transformers 5 saves a text_config instead)."""
    cfg = json.loads((qwen_vl_dir / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    hub = {**cfg, **text, "model_type": "qwen2_5_vl", "rope_theta": rope["rope_theta"]}
    hub["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    mc = load_model_config(str(tmp_path))
    assert mc.multimodal is not None and mc.mrope_section == (2, 3, 3) and mc.rope_scaling is None
    assert mc.attention_bias and not mc.o_proj_bias and mc.hidden_size == 32
    assert load_model_config(str(qwen_vl_dir)).mrope_section == (2, 3, 3)
