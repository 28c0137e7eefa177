"""LLaVA end to end below the gateway: the styler's pixels equal transformers' processor's, and the
worker's greedy tokens for prompts with zero, one and two images (one batch, mixed with text-only
requests) equal transformers' generate in fp32 on the CPU; different images never share KV."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from llava_testlib import IMAGE_TOKEN, TOKENS_PER_IMAGE, VOCAB, hundred_megapixels, png

from services.styler.images import ClipPreprocessor, ImageError, QwenVLPreprocessor, decode_image
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import ImageInput
from services.worker.request import EngineRequest, SamplingParams

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def hf_llava(llava_dir: Path) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32).eval()


@pytest.mark.parametrize(("width", "height"), [(42, 42), (64, 48), (30, 100), (333, 17)])
def test_pixels_equal_transformers_processor(llava_dir: Path, width: int, height: int) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil.from_pretrained(str(llava_dir))
    image = decode_image(png(width, height, seed=width))
    expected = hf(images=[image], return_tensors="np")["pixel_values"][0]
    ours = ClipPreprocessor.from_model_dir(str(llava_dir))(image)
    assert ours.array.dtype == np.float32 and ours.array.shape == expected.shape
    assert np.array_equal(ours.array, expected)


def test_bad_images_are_refused() -> None:
    data = png(20, 20, seed=1)
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(data[: len(data) // 2])  # truncated
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(b"plain text, not an image")
    with pytest.raises(ImageError, match="more than"):
        decode_image(hundred_megapixels())


def _prompt(images: int, seed: int, tail: int = 6) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out = [1, *torch.randint(3, IMAGE_TOKEN, (3,), generator=gen).tolist()]
    for _ in range(images):
        out += [IMAGE_TOKEN] * TOKENS_PER_IMAGE + torch.randint(3, IMAGE_TOKEN, (2,), generator=gen).tolist()
    return out + torch.randint(3, IMAGE_TOKEN, (tail,), generator=gen).tolist()


def _images(prompt: list[int], pixels: list[torch.Tensor], hashes: list[str]) -> tuple[ImageInput, ...]:
    offsets = [
        i for i, t in enumerate(prompt) if t == IMAGE_TOKEN and (i == 0 or prompt[i - 1] != IMAGE_TOKEN)
    ]
    return tuple(
        ImageInput(h, off, TOKENS_PER_IMAGE, px) for off, px, h in zip(offsets, pixels, hashes, strict=True)
    )


def _hf_greedy(hf: Any, prompt: list[int], pixels: list[torch.Tensor]) -> list[int]:
    kwargs = {"pixel_values": torch.stack(pixels)} if pixels else {}
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_with_images_matches_transformers(llava_dir: Path, hf_llava: Any, budget: int) -> None:
    pre = ClipPreprocessor.from_model_dir(str(llava_dir))
    sizes = [(42, 42), (64, 48), (30, 100), (50, 70)]
    pvs = [pre(decode_image(png(w, h, seed=i))) for i, (w, h) in enumerate(sizes)]
    pixels = [torch.from_numpy(p.array) for p in pvs]
    hashes = [p.hash for p in pvs]
    cases = [  # (prompt, image indices): text-only requests in the same batch as image ones
        (_prompt(1, seed=1), [0]),
        (_prompt(0, seed=2), []),
        (_prompt(2, seed=3), [1, 2]),
        (_prompt(1, seed=4, tail=20), [3]),
        (_prompt(0, seed=5, tail=30), []),
    ]
    engine = Engine(
        WorkerConfig(
            model=str(llava_dir),
            device="cpu",
            kv_cache_memory="4MiB",
            max_num_seqs=8,
            max_num_batched_tokens=budget,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [
        EngineRequest(
            f"r{k}",
            tuple(prompt),
            params,
            images=_images(prompt, [pixels[i] for i in idx], [hashes[i] for i in idx]),
        )
        for k, (prompt, idx) in enumerate(cases)
    ]
    results = engine.run(requests)
    for (prompt, idx), result in zip(cases, results, strict=True):
        assert result.error is None
        assert result.token_ids[0] == _hf_greedy(hf_llava, prompt, [pixels[i] for i in idx])
    assert engine.block_manager.num_used_blocks == 0


def test_same_tokens_different_images_never_share_kv(llava_dir: Path, hf_llava: Any) -> None:
    """Two prompts with equal token ids and different images: the second must not reuse the
    first's cached blocks (they hold the first image's KV); the same image again does."""
    pre = ClipPreprocessor.from_model_dir(str(llava_dir))
    a, b = (pre(decode_image(png(48, 48, seed=s))) for s in (10, 11))
    prompt = _prompt(1, seed=9, tail=24)
    engine = Engine(WorkerConfig(model=str(llava_dir), device="cpu", kv_cache_memory="4MiB", max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    runner = engine.runner
    for k, pv in enumerate((a, b, a)):
        px = torch.from_numpy(pv.array)
        req = EngineRequest(f"s{k}", tuple(prompt), params, images=_images(prompt, [px], [pv.hash]))
        (result,) = engine.run([req])
        assert result.token_ids[0] == _hf_greedy(hf_llava, prompt, [px])
        cached = result.usage.cached_prompt_tokens if result.usage else -1
        assert cached == (
            0 if k < 2 else (len(prompt) - 1) // engine.config.block_size * engine.config.block_size
        )
    assert runner.encoder_cache.misses == 2  # the third request's image came from the encoder cache


def test_images_for_a_text_model_or_out_of_range_are_refused(llava_dir: Path, stories_dir: Path) -> None:
    pv = ClipPreprocessor.from_model_dir(str(llava_dir))(decode_image(png(42, 42, seed=0)))
    image = ImageInput(pv.hash, 2, TOKENS_PER_IMAGE, torch.from_numpy(pv.array))
    text_engine = Engine(WorkerConfig(model=str(stories_dir), device="cpu", kv_cache_memory="4MiB"))
    with pytest.raises(InvalidRequestError, match="takes no images"):
        text_engine.add_request(EngineRequest("t", tuple(range(1, 20)), images=(image,)))
    engine = Engine(WorkerConfig(model=str(llava_dir), device="cpu", kv_cache_memory="4MiB"))
    with pytest.raises(InvalidRequestError, match="lie in the prompt"):
        engine.add_request(EngineRequest("u", (1, 5, 6), images=(image,)))
    short = ImageInput(pv.hash, 2, TOKENS_PER_IMAGE - 1, image.pixel_values)
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.length"):
        engine.add_request(EngineRequest("v", tuple(range(1, 20)), images=(short,)))
    small = ImageInput(pv.hash, 2, TOKENS_PER_IMAGE, torch.zeros(3, 28, 28))
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.shape"):
        engine.add_request(EngineRequest("w", tuple(range(1, 20)), images=(small,)))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("width", "height", "limits"),
    [
        (64, 48, {}),
        (30, 100, {}),
        (333, 17, {}),
        (500, 400, {"max_pixels": 28 * 28 * 16}),
        (20, 20, {"min_pixels": 56 * 56 * 4}),
    ],
)
def test_qwen_vl_pixels_equal_transformers_processor(
    tmp_path: Path, width: int, height: int, limits: dict[str, int]
) -> None:
    """Qwen2.5-VL's dynamic resolution (min_pixels / max_pixels) and patch layout, exactly."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(**limits).save_pretrained(str(tmp_path))  # type: ignore[arg-type]
    hf = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    image = decode_image(png(width, height, seed=height))
    expected = hf(images=[image], return_tensors="np")
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    ours = QwenVLPreprocessor.from_config(cfg)(image)
    assert list(ours.grid_thw) == expected["image_grid_thw"][0].tolist()
    assert ours.array.shape == expected["pixel_values"].shape
    assert np.array_equal(ours.array, expected["pixel_values"])


def test_wire_images_are_checked() -> None:
    """GenerateRequest.images: the hash must be the pixels' own (it keys caches shared by every
    request), and the bytes must match the shape."""
    from services.styler.images import PixelValues
    from services.worker.mm_inputs import images_from_pb
    from tandem.v1 import common_pb2

    pv = PixelValues.of(np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4))
    good = common_pb2.ImageInput(
        hash=pv.hash, offset=1, length=2, pixel_values=pv.array.tobytes(), shape=[3, 4, 4], dtype="float32"
    )
    (image,) = images_from_pb([good])
    assert torch.equal(image.pixel_values, torch.from_numpy(pv.array))
    forged = common_pb2.ImageInput()
    forged.CopyFrom(good)
    forged.hash = "0" * 64
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.hash"):
        images_from_pb([forged])
    short = common_pb2.ImageInput()
    short.CopyFrom(good)
    short.pixel_values = good.pixel_values[:-4]
    with pytest.raises(InvalidRequestError, match=r"images\[0\]\.pixel_values"):
        images_from_pb([short])


def test_qwen2_language_model(tmp_path: Path) -> None:
    """The language model may be any text family: a Qwen2 one (qkv bias, tied embeddings)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    torch.manual_seed(1)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=14, projection_dim=16, hidden_act="gelu",
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True,
    )  # fmt: skip
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(str(tmp_path))
    tokens = 5  # 2 x 2 patches + the CLS row ("full")
    pixels = torch.randn(3, 28, 28)
    prompt = [1, 7, 8, *[IMAGE_TOKEN] * tokens, 9, 10, 11]
    engine = Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="4MiB", max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    image = ImageInput("ab" * 32, 3, tokens, pixels)
    results = engine.run(
        [EngineRequest("a", tuple(prompt), params, images=(image,)), EngineRequest("b", (1, 5, 6), params)],
    )
    assert results[0].token_ids[0] == _hf_greedy(hf, prompt, [pixels])
    assert results[1].token_ids[0] == _hf_greedy(hf, [1, 5, 6], [])
