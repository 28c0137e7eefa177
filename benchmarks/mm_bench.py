"""Images-in benchmark (issue 25): the Qwen2.5-VL-7B shape with dummy weights, in process (no gRPC).

    python benchmarks/mm_bench.py             # GPU: the Qwen2.5-VL-7B shape, bfloat16
    python benchmarks/mm_bench.py --smoke     # CPU, a tiny shape, seconds: checks the script

Rows:
- encoder: images/s of the vision side alone (ViT + merger: `VisionEncoder`, what an encode worker
  runs) at 448x448, 1024x1024 and 1920x1080, one image per call as the worker encodes them, after
  warm-up; with the image's tokens, and the styler's CPU preprocessing time per image;
- ttft: time to the first token of one request, one 448x448 image + 100 text tokens, in an engine
  with the encoder in the worker (a new image each trial: no encoder- or prefix-cache hits), beside
  the same number of text-only prompt tokens;
- decode: output tokens/s of one request after that image prompt, against a text-only prompt of
  the same length (M-RoPE changes only the positions, so decode should be unchanged).
Encode-role disaggregation against in-worker encoding under a mixed load, through `tandem up`:
benchmarks/mm_serving_bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_report import device_label, write_report  # noqa: E402
from services.styler.images import QwenVLPreprocessor  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.encoder import VisionEncoder  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from services.worker.mm_inputs import ImageInput  # noqa: E402
from services.worker.request import EngineRequest, SamplingParams  # noqa: E402

IMAGE_PAD = 151655
# Qwen/Qwen2.5-VL-7B-Instruct's config.json (the hub's layout) and preprocessor limits
QWEN2_5_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "sliding_window": 32768,
    "use_sliding_window": False,
    "image_token_id": IMAGE_PAD,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
PREPROCESSOR_7B = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}
# The --smoke shape: the tests' tiny Qwen2.5-VL (tests/multimodal/qwen_testlib.py) with a small vocabulary
TINY: dict[str, Any] = {
    **QWEN2_5_VL_7B,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "torch_dtype": "float32",
    "vision_config": {
        **QWEN2_5_VL_7B["vision_config"],
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
}
SIZES = [(448, 448), (1024, 1024), (1920, 1080)]  # width x height
SMOKE_SIZES = [(112, 112), (224, 224), (280, 168)]


@dataclass
class Row:
    kind: str  # "encoder" | "ttft" | "decode"
    name: str
    value: float  # images/s, ms, or tokens/s
    unit: str
    tokens: int  # image tokens (encoder), prompt tokens (ttft, decode)
    extra: dict[str, float]


def write_model(root: Path, cfg: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_7B))
    return root


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_input(pre: QwenVLPreprocessor, width: int, height: int, seed: int, offset: int = 0) -> ImageInput:
    pixels = pre(random_image(width, height, seed))
    return ImageInput(
        pixels.hash, offset, pre.num_tokens(pixels), torch.from_numpy(pixels.array), pixels.grid_thw
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_encoder(model_dir: Path, device: str, sizes: list[tuple[int, int]], iters: int) -> list[Row]:
    encoder = VisionEncoder(
        WorkerConfig(model=str(model_dir), device=device, role="encode", load_format="dummy")
    )
    pre = QwenVLPreprocessor.from_model_dir(str(model_dir))
    rows = []
    with torch.inference_mode():
        for width, height in sizes:
            start = time.perf_counter()
            images = [image_input(pre, width, height, seed=s) for s in range(iters + 1)]
            preprocess_ms = (time.perf_counter() - start) * 1000 / len(images)
            encoder.model.encode_image(images[0])  # warm-up (kernels, allocator)
            sync(encoder.device)
            start = time.perf_counter()
            for image in images[1:]:
                encoder.model.encode_image(image)  # not through the cache: every call encodes
            sync(encoder.device)
            seconds = (time.perf_counter() - start) / iters
            row = Row(
                "encoder",
                f"{width}x{height}",
                1 / seconds,
                "images/s",
                images[0].length,
                {
                    "ms_per_image": seconds * 1000,
                    "preprocess_ms": preprocess_ms,
                    "patches": images[0].length * 4,
                },
            )
            print(
                f"  encoder {row.name:>10}: {row.value:8.2f} images/s  ({row.tokens} tokens, "
                f"{seconds * 1000:.1f} ms; preprocessing {preprocess_ms:.1f} ms on the CPU)",
                flush=True,
            )
            rows.append(row)
    del encoder
    free()
    return rows


def first_token_ms(engine: Engine, req: EngineRequest) -> float:
    """Milliseconds from queueing `req` to its first output token (the engine otherwise idle)."""
    sync(engine.device)
    start = time.perf_counter()
    engine.add_request(req)
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and any(c.token_ids for c in out.choices):
                sync(engine.device)
                first = time.perf_counter()
    assert first is not None
    return (first - start) * 1000


def decode_rate(engine: Engine, req: EngineRequest) -> float:
    """Output tokens/s of one request after its first token."""
    engine.add_request(req)
    times: list[float] = []
    while engine.has_unfinished():
        for out in engine.step():
            times += [time.perf_counter()] * sum(len(c.token_ids) for c in out.choices)
    sync(engine.device)
    return (len(times) - 1) / (times[-1] - times[0])


def bench_engine(
    model_dir: Path, device: str, size: tuple[int, int], text_tokens: int, trials: int, decode_tokens: int
) -> list[Row]:
    engine = Engine(
        WorkerConfig(
            model=str(model_dir),
            device=device,
            load_format="dummy",
            max_model_len=8192,
            max_num_seqs=4,
            enable_prefix_caching=False,
            kv_cache_memory="" if device.startswith("cuda") else "64MiB",
        )
    )
    pre = QwenVLPreprocessor.from_model_dir(str(model_dir))
    gen = torch.Generator().manual_seed(0)
    vocab = min(int(engine.model_config.vocab_size), 150000)
    head = text_tokens // 2

    def image_request(k: int, max_tokens: int) -> tuple[EngineRequest, int]:
        image = image_input(pre, *size, seed=1000 + k, offset=head)  # a new image: no cache hits
        text = torch.randint(3, vocab, (text_tokens,), generator=gen).tolist()
        prompt = (*text[:head], *[IMAGE_PAD] * image.length, *text[head:])
        params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return EngineRequest(f"img{k}-{max_tokens}", prompt, params, images=(image,)), len(prompt)

    def text_request(k: int, length: int, max_tokens: int) -> EngineRequest:
        prompt = tuple(torch.randint(3, vocab, (length,), generator=gen).tolist())
        params: SamplingParams[Any] = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return EngineRequest(f"txt{k}-{max_tokens}", prompt, params)

    with torch.inference_mode():
        first_token_ms(engine, image_request(-1, 1)[0])  # warm-up
        image_ms, text_ms = [], []
        length = 0
        for k in range(trials):
            req, length = image_request(k, 1)
            image_ms.append(first_token_ms(engine, req))
            text_ms.append(first_token_ms(engine, text_request(k, length, 1)))
        rows = [
            Row("ttft", f"1 image {size[0]}x{size[1]} + {text_tokens} text tokens", statistics.median(image_ms),
                "ms", length, {"min_ms": min(image_ms)}),
            Row("ttft", f"text only, {length} tokens", statistics.median(text_ms), "ms", length,
                {"min_ms": min(text_ms)}),
        ]  # fmt: skip
        image_rate = decode_rate(engine, image_request(trials, decode_tokens)[0])
        text_rate = decode_rate(engine, text_request(trials, length, decode_tokens))
        rows += [
            Row("decode", "after the image prompt", image_rate, "tokens/s", length, {}),
            Row(
                "decode",
                "after a text-only prompt",
                text_rate,
                "tokens/s",
                length,
                {"ratio": image_rate / text_rate},
            ),
        ]
    for row in rows:
        print(f"  {row.kind:<6} {row.name:<44} {row.value:10.2f} {row.unit}", flush=True)
    del engine
    free()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, a tiny shape: checks the script in seconds"
    )
    parser.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda; cpu with --smoke)")
    parser.add_argument(
        "--iters", type=int, default=0, help="encoder calls per size (default 20; 2 with --smoke)"
    )
    parser.add_argument("--trials", type=int, default=0, help="TTFT trials (default 10; 2 with --smoke)")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens beside the TTFT image")
    parser.add_argument(
        "--decode-tokens", type=int, default=0, help="decode-rate output tokens (default 128; 8 with --smoke)"
    )
    parser.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/mm_<device>_<date>.json)"
    )
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --smoke (or --device cpu) for the CPU check", file=sys.stderr)
        return 2
    cfg = TINY if args.smoke else QWEN2_5_VL_7B
    sizes = SMOKE_SIZES if args.smoke else SIZES
    iters = args.iters or (2 if args.smoke else 20)
    trials = args.trials or (2 if args.smoke else 10)
    decode_tokens = args.decode_tokens or (8 if args.smoke else 128)
    shape = "tiny" if args.smoke else "Qwen2.5-VL-7B"
    device_name = device_label(device)
    model_dir = write_model(Path(tempfile.mkdtemp(prefix="mm_bench_")), cfg)
    print(f"{shape} (dummy weights) on {device_name}", flush=True)
    rows = bench_encoder(model_dir, device, sizes, iters)
    rows += bench_engine(model_dir, device, sizes[0], args.text_tokens, trials, decode_tokens)
    out = write_report(
        "mm",
        device_name,
        args.smoke,
        args.out,
        {
            "shape": shape,
            "rows": [asdict(r) for r in rows],
        },
    )
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
