"""LLaVA-NeXT (anyres tiling) and SigLIP vision towers against transformers: the styler's
pixels and placeholder counts equal `LlavaNextImageProcessor` / `LlavaNextProcessor`'s exactly
for sizes that select different grid pinpoints; the worker's greedy tokens for prompts with
zero, one and two images of different sizes (one batch, with text-only requests, with and
without chunked prefill) equal `generate` in fp32 on the CPU; a LLaVA-1.5 with a SigLIP tower
likewise; one image chat through the real stack with the openai client."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from gateway_stack import Stack
from llava_testlib import IMAGE_TOKEN, VOCAB, chat, image_part, png, write_tokenizer_files
from PIL import Image

from services.common import anyres
from services.styler.images import ClipPreprocessor, LlavaNextPreprocessor, decode_image
from services.styler.multimodal import ImageSupport
from services.styler.tokenizer import Tokenizer
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import ImageInput, image_to_pb, images_from_pb
from services.worker.request import EngineRequest, SamplingParams

TILE = 28  # 2 x 2 patches of 14 a tile: 4 rows a tile ("default": CLS dropped)
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
MAX_TOKENS = 10
# (width, height): square, wide, tall, very wide, very tall, large (different pinpoints)
SIZES = [(28, 28), (64, 48), (30, 100), (333, 17), (17, 333), (200, 180), (90, 40)]


def _randomize(model: Any) -> None:
    with torch.no_grad():  # random norms / biases / newline so that a wrong order shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "image_newline" in name:
                p.add_(torch.randn_like(p) * 0.3)


def _text_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
    )  # fmt: skip


def _vision_config(kind: str, layers: int = 3) -> Any:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=TILE, patch_size=14,
    )  # fmt: skip


def make_next_dir(path: Path, stories_dir: Path, tower: str = "clip", seed: int = 0) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=_vision_config(tower), text_config=_text_config(), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(str(path))
    LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
    ).save_pretrained(str(path))
    write_tokenizer_files(stories_dir, path)
    return path


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    return make_next_dir(tmp_path_factory.mktemp("tiny-llava-next"), stories_dir)


@pytest.fixture(scope="module")
def hf_next(next_dir: Path) -> Any:
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(next_dir), dtype=torch.float32).eval()


def _hf_processor(model_dir: Path, tower: str = "clip") -> Any:
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(str(model_dir)),
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        patch_size=14,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        num_additional_image_tokens=1 if tower == "clip" else 0,
        image_token="<image>",
    )


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_pixels_and_token_counts_equal_transformers(next_dir: Path, width: int, height: int) -> None:
    hf = _hf_processor(next_dir)
    image = decode_image(png(width, height, seed=width))
    expected = hf(text="a <image> b", images=[image], return_tensors="np")
    ours = LlavaNextPreprocessor.from_model_dir(str(next_dir))(image)
    assert ours.array.dtype == np.float32 and ours.array.shape == expected["pixel_values"][0].shape
    assert np.array_equal(ours.array, expected["pixel_values"][0])
    assert list(ours.grid_thw[1:]) == expected["image_sizes"][0].tolist()
    support = ImageSupport.from_model_dir(str(next_dir), Tokenizer.from_dir(str(next_dir)))
    assert support is not None
    assert support.num_tokens(ours) == int((expected["input_ids"][0] == IMAGE_TOKEN).sum())


def test_sizes_select_different_pinpoints() -> None:
    chosen = {anyres.select_best_resolution(h, w, PINPOINTS) for w, h in SIZES}
    assert len(chosen) >= 4


def _hf_greedy(
    hf: Any, prompt: list[int], pixels: list[torch.Tensor], sizes: list[tuple[int, int]]
) -> list[int]:
    kwargs: dict[str, Any] = {}
    if pixels:
        most = max(p.shape[0] for p in pixels)  # padded on the tile axis, as the processor does
        padded = [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixels]
        kwargs = {"pixel_values": torch.stack(padded), "image_sizes": torch.tensor(sizes)}
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    return list(out[0, len(prompt) :].tolist())


def _request(
    rid: str, seed: int, lengths: list[int], pixels: list[Any], tail: int = 6
) -> tuple[EngineRequest, list[int]]:
    """A prompt of random text with `lengths[k]` placeholder tokens for image k."""
    gen = torch.Generator().manual_seed(seed)
    prompt = [1, *torch.randint(3, IMAGE_TOKEN, (3,), generator=gen).tolist()]
    images = []
    for n, pv in zip(lengths, pixels, strict=True):
        images.append(ImageInput(pv.hash, len(prompt), n, torch.from_numpy(pv.array.copy()), pv.grid_thw))
        prompt += [IMAGE_TOKEN] * n + torch.randint(3, IMAGE_TOKEN, (2,), generator=gen).tolist()
    prompt += torch.randint(3, IMAGE_TOKEN, (tail,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return EngineRequest(rid, tuple(prompt), params, images=tuple(images)), prompt


def _check_greedy(model_dir: Path, hf: Any, budget: int, sizes: list[tuple[int, int]]) -> None:
    support = ImageSupport.from_model_dir(str(model_dir), Tokenizer.from_dir(str(model_dir)))
    assert support is not None
    pvs = [support.preprocess(decode_image(png(w, h, seed=i))) for i, (w, h) in enumerate(sizes)]
    lens = [support.num_tokens(pv) for pv in pvs]
    cases = [(1, [0]), (2, []), (3, [1, 2]), (4, [3]), (5, [])]  # (seed, images)
    built = [
        _request(f"r{seed}", seed, [lens[i] for i in idx], [pvs[i] for i in idx], tail=6 + 5 * seed)
        for seed, idx in cases
    ]
    engine = Engine(
        WorkerConfig(
            model=str(model_dir), device="cpu", kv_cache_memory="8MiB", max_num_seqs=8,
            max_num_batched_tokens=budget,
        )
    )  # fmt: skip
    results = engine.run([req for req, _ in built])
    for (_, idx), (_, prompt), result in zip(cases, built, results, strict=True):
        assert result.error is None
        pixels = [torch.from_numpy(pvs[i].array.copy()) for i in idx]
        if isinstance(support.preprocess, LlavaNextPreprocessor):
            image_sizes = [(pvs[i].grid_thw[1], pvs[i].grid_thw[2]) for i in idx]
            expected = _hf_greedy(hf, prompt, pixels, image_sizes)
        else:
            expected = _hf_greedy_llava(hf, prompt, pixels)
        assert result.token_ids[0] == expected
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_with_images_matches_transformers(next_dir: Path, hf_next: Any, budget: int) -> None:
    # four sizes, four pinpoints: different tile grids and token counts per image
    _check_greedy(next_dir, hf_next, budget, [(64, 48), (30, 100), (333, 17), (200, 180)])


def test_bad_images_are_refused_at_admission(next_dir: Path) -> None:
    pv = LlavaNextPreprocessor.from_model_dir(str(next_dir))(decode_image(png(64, 48, seed=0)))
    support = ImageSupport.from_model_dir(str(next_dir), Tokenizer.from_dir(str(next_dir)))
    assert support is not None
    n = support.num_tokens(pv)
    engine = Engine(WorkerConfig(model=str(next_dir), device="cpu", kv_cache_memory="4MiB"))
    prompt = tuple(range(1, n + 10))
    px = torch.from_numpy(pv.array.copy())
    cases = [
        (ImageInput(pv.hash, 2, n - 1, px, pv.grid_thw), r"images\[0\]\.length"),
        (ImageInput(pv.hash, 2, n, px[:-1], pv.grid_thw), r"images\[0\]\.shape"),
        (ImageInput(pv.hash, 2, n, px, ()), r"images\[0\]\.grid_thw"),
        # the same pixels claimed for another size: another token count
        (ImageInput(pv.hash, 2, n, px, (1, 48, 640)), r"images\[0\]\.length"),
    ]
    for k, (image, match) in enumerate(cases):
        with pytest.raises(InvalidRequestError, match=match):
            engine.add_request(EngineRequest(f"b{k}", prompt, images=(image,)))
    assert not engine.has_unfinished()
    # on the wire: [tiles, C, S, S] pixels round-trip and their hash covers the size
    (wire,) = images_from_pb([image_to_pb(ImageInput(pv.hash, 2, n, px, pv.grid_thw))])
    assert torch.equal(wire.pixel_values, px) and wire.grid_thw == pv.grid_thw


# --- SigLIP towers -------------------------------------------------------------------------


def _hf_greedy_llava(hf: Any, prompt: list[int], pixels: list[torch.Tensor]) -> list[int]:
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
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize(("strategy", "layer"), [("full", -1), ("default", -2)])
def test_siglip_llava_matches_transformers(
    tmp_path: Path, stories_dir: Path, strategy: str, layer: int
) -> None:
    """A LLaVA-1.5 with a SigLIP tower (no CLS row: "default" drops its first patch, as
    transformers does), with and without chunked prefill."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(3)
    cfg = LlavaConfig(
        vision_config=_vision_config("siglip"), text_config=_text_config(), image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy=strategy, vision_feature_layer=layer,
    )  # fmt: skip
    hf = LlavaForConditionalGeneration(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(str(tmp_path))
    SiglipImageProcessorPil(size={"height": TILE, "width": TILE}).save_pretrained(str(tmp_path))
    write_tokenizer_files(stories_dir, tmp_path)
    # the checkpoint's pooling head and post-layernorm load (unused), and the rows are per patch
    support = ImageSupport.from_model_dir(str(tmp_path), Tokenizer.from_dir(str(tmp_path)))
    assert support is not None and support.tokens_per_image == 4 - (strategy == "default")
    for budget in (2048, 3):
        _check_greedy(tmp_path, hf, budget, [(28, 28), (64, 48), (30, 100), (50, 70)])


@pytest.mark.parametrize(("width", "height"), [(28, 28), (64, 48), (30, 100), (333, 17)])
def test_siglip_pixels_equal_transformers_processor(tmp_path: Path, width: int, height: int) -> None:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    SiglipImageProcessorPil(size={"height": TILE, "width": TILE}).save_pretrained(str(tmp_path))
    hf = SiglipImageProcessorPil.from_pretrained(str(tmp_path))
    image = decode_image(png(width, height, seed=height))
    expected = hf(images=[image], return_tensors="np")["pixel_values"][0]
    ours = ClipPreprocessor.from_model_dir(str(tmp_path))(image)
    assert ours.array.shape == expected.shape and np.array_equal(ours.array, expected)


def test_siglip_llava_next_matches_transformers(tmp_path: Path, stories_dir: Path) -> None:
    from transformers import LlavaNextForConditionalGeneration

    model_dir = make_next_dir(tmp_path, stories_dir, tower="siglip", seed=4)
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    _check_greedy(model_dir, hf, 16, [(64, 48), (30, 100), (333, 17), (200, 180)])


# --- through the gateway ---------------------------------------------------------------------


@pytest.mark.e2e
def test_image_chat_through_the_gateway(next_dir: Path, hf_next: Any, tmp_path: Path) -> None:
    image = png(90, 40, seed=7)
    hf = _hf_processor(next_dir)
    prompt = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "look <image> what"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    # (the template's text as the styler tokenizes it: no BOS added on top)
    inputs = hf(text=prompt, images=[pil], return_tensors="pt", add_special_tokens=False)
    out = hf_next.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    ids = inputs["input_ids"][0].tolist()
    new = [t for t in out[0, len(ids) :].tolist() if t != 2]
    full = hf.tokenizer.decode(ids + new, skip_special_tokens=True)
    expected = full[len(hf.tokenizer.decode(ids, skip_special_tokens=True)) :]
    stack = Stack(tmp_path, next_dir).start()
    try:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        parts = [{"type": "text", "text": "look "}, image_part(image), {"type": "text", "text": " what"}]
        answer = chat(client, parts)
        assert answer.choices[0].message.content == expected
        assert answer.usage is not None and answer.usage.prompt_tokens == len(ids)
        bad = [image_part(png(20, 20, seed=3)[:40])]
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, bad)
        assert err.value.body is not None and "messages[0].content[0]" in str(err.value.body)
        assert chat(client, parts).choices[0].message.content == expected  # unaffected
    finally:
        stack.stop()


def test_encode_worker_rows(next_dir: Path, hf_next: Any) -> None:
    """An encode worker (vision side only: tower, projector and image_newline) gives the unified
    worker's rows; sent as rows, the greedy tokens still equal transformers'."""
    from services.worker.encoder import VisionEncoder

    encoder = VisionEncoder(WorkerConfig(model=str(next_dir), device="cpu", role="encode"))
    pv = LlavaNextPreprocessor.from_model_dir(str(next_dir))(decode_image(png(90, 40, seed=5)))
    support = ImageSupport.from_model_dir(str(next_dir), Tokenizer.from_dir(str(next_dir)))
    assert support is not None
    req, prompt = _request("e", 11, [support.num_tokens(pv)], [pv])
    (embedded,) = encoder.encode(req.images)
    engine = Engine(WorkerConfig(model=str(next_dir), device="cpu", kv_cache_memory="4MiB"))
    assert embedded.embeds is not None
    assert torch.equal(embedded.embeds, engine.runner.model.encode_image(req.images[0]))  # type: ignore[operator]
    (wire,) = images_from_pb([image_to_pb(embedded)])
    (result,) = engine.run([EngineRequest("e", req.prompt_token_ids, req.sampling, images=(wire,))])
    assert engine.runner.encoder_cache.misses == 0
    pixels = [torch.from_numpy(pv.array.copy())]
    assert result.token_ids[0] == _hf_greedy(hf_next, prompt, pixels, [(40, 90)])
