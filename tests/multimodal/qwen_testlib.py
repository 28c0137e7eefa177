"""A tiny random Qwen2.5-VL saved as a real HF model directory (the Qwen2.5 tokenizer with its
vision tokens at their real ids, Qwen2-VL's chat template, a dynamic-resolution image processor),
and transformers' processor and greedy generate on it, for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from llava_testlib import data_url

from services.styler.images import decode_image
from services.worker.mm_inputs import ImageInput
from services.worker.request import EngineRequest, SamplingParams

VOCAB = 151936
VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655
EOS = 151645
MAX_TOKENS = 8  # greedy tokens each test compares
# Small images: at most 64 merged patches (256 patches of 14 px), at least 2 x 2 merged patches
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
# The tokens Qwen2.5's tokenizer adds after <|im_end|> (151646 ...); our copy of its tokenizer.json
# has "[PAD<id>]" entries at those ids, which take the real names here.
_QWEN_ADDED = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
# Qwen2-VL / Qwen2.5-VL's chat template (the hub's chat_template.json)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(shared_dir: Path, path: Path) -> None:
    src = shared_dir / "tokenizers" / "qwen2.5"
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    for i, name in enumerate(_QWEN_ADDED):
        token_id = 151646 + i
        vocab[name] = vocab.pop(f"[PAD{token_id}]")
        entry = {"content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
        tok["added_tokens"].append({"id": token_id, **entry, "special": True})
        cfg["added_tokens_decoder"][str(token_id)] = {**entry, "special": True}
    cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_model_dir(shared_dir: Path, path: Path, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            eos_token_id=EOS, bos_token_id=151643,
        ),
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and biases so that a wrong layer order or layout shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(path))
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(str(path))
    write_tokenizer(shared_dir, path)
    (path / "processor_config.json").write_text(json.dumps({"image_token": "<|image_pad|>"}))
    return path


def hf_processor(model_dir: Path) -> Any:
    """transformers' Qwen2_5_VLProcessor for the directory (without a video processor, which
    needs torchvision: the images path never uses it)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):  # type: ignore[misc]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)
            return None

    return ImagesOnly(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(model_dir)),
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        video_processor=BaseVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def hf_inputs(processor: Any, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """The processor's model inputs for a chat (images in the order of their parts)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def hf_greedy(model: Any, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0
    )
    return [int(t) for t in out[0, prompt_len:]]


def chat_messages(
    texts_and_images: list[str | bytes],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
    """(OpenAI chat messages, transformers' messages, PIL images) for one user turn."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    images = []
    for part in texts_and_images:
        if isinstance(part, str):
            ours.append({"type": "text", "text": part})
            theirs.append({"type": "text", "text": part})
        else:
            ours.append({"type": "image_url", "image_url": {"url": data_url(part)}})
            theirs.append({"type": "image"})
            images.append(decode_image(part))
    return [{"role": "user", "content": ours}], [{"role": "user", "content": theirs}], images


def engine_request(request_id: str, rendered: Any) -> EngineRequest:
    images = tuple(
        ImageInput(
            im.pixels.hash, im.offset, im.length, torch.from_numpy(im.pixels.array), im.pixels.grid_thw
        )
        for im in rendered.images
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return EngineRequest(request_id, tuple(rendered.token_ids), params, images=images)


_ANSWERS: dict[tuple[str, tuple[str | bytes, ...]], tuple[list[int], int]] = {}


def hf_answer(model: Any, processor: Any, conversation: list[str | bytes]) -> tuple[list[int], int]:
    """transformers' greedy tokens for a one-turn conversation and its prompt length (computed
    once per model directory and conversation: several tests compare against the same)."""
    key = (str(model.config._name_or_path), tuple(conversation))
    if key not in _ANSWERS:
        _, messages, images = chat_messages(conversation)
        inputs = hf_inputs(processor, messages, images)
        _ANSWERS[key] = (hf_greedy(model, inputs, MAX_TOKENS), int(inputs["input_ids"].shape[1]))
    return _ANSWERS[key]
