"""Multimodal test fixtures: a tiny random LLaVA (CLIP tower + Llama) saved as a real HF model
directory with its image processor, a chat template and the stories260K tokenizer plus an
"<image>" token; one real stack serving it (styler, CPU worker, gateway) for the API tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_stack import Stack
from llava_testlib import IMAGE_SIZE, IMAGE_TOKEN, VOCAB, write_tokenizer_files

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=14, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
    )  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms so that a wrong layer order shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(str(path))
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(str(path))
    write_tokenizer_files(stories_dir, path)
    return path


@pytest.fixture(scope="session")
def qwen_vl_dir(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A tiny random Qwen2.5-VL (window + full attention ViT, M-RoPE Qwen2) with the Qwen2.5
    tokenizer and its vision tokens (qwen_testlib.py)."""
    from qwen_testlib import make_model_dir

    return make_model_dir(shared_dir, tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def llava_stack(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Images from `localhost` URLs allowed; Responses stored in the run directory."""
    run_dir = tmp_path_factory.mktemp("llava-stack")
    args = ["--allowed-media-domains", "localhost", "--responses-db", str(run_dir / "responses.sqlite3")]
    stack = Stack(run_dir, llava_dir, gateway_args=args)
    try:
        yield stack.start()
    finally:
        stack.stop()
