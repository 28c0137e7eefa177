"""Encode-role disaggregation against in-worker encoding under a mixed load (issue 25), through
`tandem up` and the gateway: the Qwen2.5-VL-7B shape with dummy weights.

    python benchmarks/mm_serving_bench.py --device cuda   # GPU: both modes on one GPU, minutes
    python benchmarks/mm_serving_bench.py --smoke         # CPU, a tiny shape: checks the script

Modes: `in-worker` (`tandem up`, one unified worker that encodes its images itself) and
`encode-role` (`tandem up --encode-workers 1`: the gateway has an encode worker on the same device
turn each image into embedding rows, which travel to the unified worker in the Generate request;
docs/multimodal.md). On a GPU every worker gets `--gpu-memory-utilization 0.8` in both modes (the
unified worker sizes its KV cache from the GPU's memory; the encode worker needs the rest).

Load: a closed loop at each of --concurrency, --num-requests streamed /v1/chat/completions
requests per point, --image-fraction of them image requests (one `data:` PNG of --image-size, new
pixels every request so that no encoder- or prefix-cache hit happens, between two halves of
--text-tokens random words) and the rest text-only requests of about as many prompt tokens (the
text plus the image's placeholder tokens), in a seeded random order; --output-len tokens each
(`ignore_eos`). Per mode and point: TTFT p50/p99 and ITL (time between streamed tokens) p50/p99
for image and text requests apart, output tokens/s, requests/s, the cores each service kept busy,
and where the images were encoded (each worker's `Info` counters); then encode-role's ratios to
in-worker at each point. JSON to benchmarks/results/mm_serving_<device>_<date>.json (a temporary
folder with --smoke; --out to choose; copied into $OUT when set), rewritten after every point so
that a run cut short keeps its points, and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
# The Qwen2.5 tokenizer with its vision tokens at their real ids and Qwen2-VL's chat template:
# the tests' model directory (one home for that patch of the shared tokenizer).
sys.path.insert(0, str(REPO / "tests" / "multimodal"))

from llava_testlib import data_url, png  # noqa: E402
from mm_bench import QWEN2_5_VL_7B, TINY, write_model  # noqa: E402
from qwen_testlib import write_tokenizer  # noqa: E402
from serving_bench import CpuMeter, free_port, launch_up, pct, sse_chunks, stop_up  # noqa: E402

from benchmarks.bench_report import device_label, write_report  # noqa: E402

MODES = {"in-worker": 0, "encode-role": 1}  # mode: --encode-workers
MODEL_NAME = "qwen-vl"
KINDS = ("image", "text")


@dataclass
class Result:
    kind: str  # "image" | "text"
    ok: bool = False
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Request:
    kind: str
    body: dict[str, Any]


def shared_dir() -> Path:
    return Path(os.environ.get("TANDEM_SHARED", REPO.parent / "shared"))


def make_model_dir(root: Path, cfg: dict[str, Any], shared: Path) -> Path:
    """mm_bench's dummy-weight config + preprocessor limits, with a tokenizer and chat template the
    styler can serve."""
    if not (shared / "tokenizers" / "qwen2.5" / "tokenizer.json").is_file():
        raise SystemExit(f"no Qwen2.5 tokenizer at {shared}/tokenizers/qwen2.5 (set TANDEM_SHARED)")
    write_model(root, cfg)
    write_tokenizer(shared, root)
    (root / "processor_config.json").write_text(json.dumps({"image_token": "<|image_pad|>"}))
    return root


def one_token_words(model_dir: Path) -> list[str]:
    """Lowercase words that are one token each after a space (' word'): text of N of them is
    about N prompt tokens."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    words = [t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha()]
    return sorted(w for w in words if w.islower() and 3 <= len(w) <= 8)


def image_tokens(model_dir: Path, width: int, height: int) -> int:
    """Placeholder tokens of one image (what the styler expands `<|image_pad|>` to)."""
    from PIL import Image

    from services.styler.images import QwenVLPreprocessor

    pre = QwenVLPreprocessor.from_model_dir(str(model_dir))
    return int(pre.num_tokens(pre(Image.new("RGB", (width, height)))))


def make_requests(
    args: argparse.Namespace, words: list[str], num: int, seed: str, num_image_tokens: int
) -> list[Request]:
    """`num` requests, round(num * --image-fraction) of them image requests, in a seeded order;
    every request's text and image are its own (no cache hits)."""
    rng = random.Random(seed)
    num_images = round(num * args.image_fraction)
    kinds = ["image"] * num_images + ["text"] * (num - num_images)
    rng.shuffle(kinds)
    width, height = args.image_width, args.image_height
    requests = []
    for kind in kinds:

        def text(n: int) -> str:
            return "".join(" " + rng.choice(words) for _ in range(n))

        head = args.text_tokens // 2
        if kind == "image":
            image = png(width, height, seed=rng.randrange(1 << 31))
            content: list[dict[str, Any]] = [
                {"type": "text", "text": text(head)},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": text(args.text_tokens - head)},
            ]
        else:
            content = [{"type": "text", "text": text(args.text_tokens + num_image_tokens)}]
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        requests.append(Request(kind, body))
    return requests


async def one_request(session: aiohttp.ClientSession, url: str, req: Request) -> Result:
    """One streamed chat completion. TTFT: the first chunk with a choice (the role chunk goes out
    with the first token); ITL: the gaps between the chunks that carry text after it."""
    res = Result(req.kind)
    start = time.perf_counter()
    last: float | None = None
    try:
        async with session.post(url, json=req.body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.completion_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - start
                if not choices[0].get("delta", {}).get("content"):
                    continue
                if last is not None:
                    res.itls.append(now - last)
                last = now
        res.ok = res.completion_tokens > 0
        if not res.ok:
            res.error = "no usage in the stream"
    except Exception as exc:  # a failed request is counted, not fatal
        res.error = repr(exc)[:200]
    return res


async def closed_loop(url: str, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
    queue = list(reversed(requests))
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def loop() -> None:
            while queue:
                results.append(await one_request(session, url, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    point: dict[str, Any] = {
        "num_requests": len(results),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration,
        "output_tok_per_s": sum(r.completion_tokens for r in ok) / duration,
        "req_per_s": len(ok) / duration,
    }
    for kind in KINDS:
        mine = [r for r in ok if r.kind == kind]
        ttfts = [r.ttft for r in mine]
        itls = [x for r in mine for x in r.itls]
        point[kind] = {
            "completed": len(mine),
            "failed": sum(1 for r in results if r.kind == kind and not r.ok),
            "mean_prompt_tokens": sum(r.prompt_tokens for r in mine) / max(len(mine), 1),
            "ttft_p50_ms": (pct(ttfts, 0.5) or 0) * 1e3,
            "ttft_p99_ms": (pct(ttfts, 0.99) or 0) * 1e3,
            "itl_p50_ms": (pct(itls, 0.5) or 0) * 1e3,
            "itl_p99_ms": (pct(itls, 0.99) or 0) * 1e3,
        }
    return point


def worker_args(args: argparse.Namespace, num_image_tokens: int) -> str:
    max_len = args.text_tokens + num_image_tokens + args.output_len + 128  # + the chat template's
    extra = " --gpu-memory-utilization 0.8" if args.device.startswith("cuda") else ""
    return f"--load-format dummy --max-model-len {max_len}{extra} {args.worker_args}".strip()


def start_up(
    model_dir: Path, encode_workers: int, wargs: str, args: argparse.Namespace, run_dir: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "tandem", "up", "--model", str(model_dir), "--port", str(port)]
    argv += ["--device", args.device, "--worker-args", wargs, "--served-model-name", MODEL_NAME]
    argv += ["--encode-workers", str(encode_workers), "--run-dir", str(run_dir)]
    argv += ["--startup-timeout", str(args.startup_timeout)]
    return launch_up(argv, port, log, args.startup_timeout + 30)


def encoder_counters(run_dir: Path) -> dict[str, dict[str, int]]:
    """Images encoded and encoder-cache hits per worker since start (each worker's `Info`)."""
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    counters = {}
    for sock in sorted(run_dir.glob("*worker-*.sock")):
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=30)
        counters[sock.stem] = {
            "images_encoded": info.num_images_encoded,
            "encoder_cache_hits": info.num_encoder_cache_hits,
        }
    return counters


def run_mode(
    mode: str,
    model_dir: Path,
    args: argparse.Namespace,
    words: list[str],
    num_image_tokens: int,
    tmp: Path,
    result: dict[str, Any],
    save: Callable[[], Path],
) -> None:
    """Start the mode's stack, warm it up and run every point, filling `result` (and saving the
    report) as it goes: a run cut short keeps what it measured."""
    run_dir = tmp / f"run-{mode}"
    log = tmp / f"up-{mode}.log"
    start = time.perf_counter()
    proc, url = start_up(model_dir, MODES[mode], worker_args(args, num_image_tokens), args, run_dir, log)
    result["startup_s"] = time.perf_counter() - start
    print(f"{mode}: serving after {result['startup_s']:.1f} s", flush=True)
    url += "/v1/chat/completions"
    try:
        warmup = make_requests(args, words, args.warmup, f"warmup-{mode}", num_image_tokens)
        results, _ = asyncio.run(closed_loop(url, warmup, 2))
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{mode}: warm-up requests failed: {failed[:3]}")
        for conc in args.concurrency:
            # The same requests in both modes (seeded by the point), new to the stack each time
            requests = make_requests(args, words, args.num_requests, f"c{conc}", num_image_tokens)
            meter = CpuMeter(proc.pid)
            results, duration = asyncio.run(closed_loop(url, requests, conc))
            point = {"concurrency": conc, **summarize(results, duration)}
            point["cores_busy"] = meter.cores_busy(duration)
            result["points"].append(point)
            print_point(mode, point)
            save()
        result["encoder_counters"] = encoder_counters(run_dir)
    finally:
        stop_up(proc)


def print_point(mode: str, p: dict[str, Any]) -> None:
    im, tx = p["image"], p["text"]
    print(
        f"{mode:>12} conc {p['concurrency']:>3}: {p['output_tok_per_s']:8.1f} tok/s {p['req_per_s']:6.2f} req/s | "
        f"image ({im['completed']}) TTFT {im['ttft_p50_ms']:7.1f}/{im['ttft_p99_ms']:7.1f} "
        f"ITL {im['itl_p50_ms']:6.1f}/{im['itl_p99_ms']:6.1f} ms | "
        f"text ({tx['completed']}) TTFT {tx['ttft_p50_ms']:7.1f}/{tx['ttft_p99_ms']:7.1f} "
        f"ITL {tx['itl_p50_ms']:6.1f}/{tx['itl_p99_ms']:6.1f} ms | failed {p['num_failed']}",
        flush=True,
    )


RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def ratios(modes: dict[str, Any]) -> list[dict[str, Any]]:
    """encode-role / in-worker at each concurrency (throughput > 1 and latency < 1 favour the
    encode role)."""
    if not {"in-worker", "encode-role"} <= modes.keys():
        return []
    base = {p["concurrency"]: p for p in modes["in-worker"]["points"]}
    rows = []
    for p in modes["encode-role"]["points"]:
        b = base.get(p["concurrency"])
        if b is None:
            continue

        def ratio(a: float, c: float) -> float | None:
            return round(a / c, 3) if c else None

        row: dict[str, Any] = {
            "concurrency": p["concurrency"],
            "output_tok_per_s": ratio(p["output_tok_per_s"], b["output_tok_per_s"]),
            "req_per_s": ratio(p["req_per_s"], b["req_per_s"]),
        }
        for kind in KINDS:
            for key in RATIO_KEYS:
                row[f"{kind}_{key}"] = ratio(p[kind][key], b[kind][key])
        rows.append(row)
    return rows


def print_table(modes: dict[str, Any], ratio_rows: list[dict[str, Any]]) -> None:
    cols = ["tok/s", "req/s"] + [f"{k[0]}.{m}" for k in KINDS for m in ("TTFT50", "TTFT99", "ITL50", "ITL99")]
    print("\nmode          conc " + " ".join(f"{c:>9}" for c in cols) + "   (ms; i. image, t. text)")
    for mode, result in modes.items():
        for p in result["points"]:
            values = [p["output_tok_per_s"], p["req_per_s"]]
            values += [p[kind][key] for kind in KINDS for key in RATIO_KEYS]
            print(f"{mode:<12} {p['concurrency']:>5} " + " ".join(f"{v:9.2f}" for v in values))
    for row in ratio_rows:
        values = [row["output_tok_per_s"], row["req_per_s"]]
        values += [row[f"{kind}_{key}"] for kind in KINDS for key in RATIO_KEYS]
        cells = " ".join(f"{v:9.3f}" if v is not None else f"{'-':>9}" for v in values)
        print(f"{'ratio e/i':<12} {row['concurrency']:>5} {cells}")


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, a tiny shape, few requests: checks the script"
    )
    parser.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda; cpu with --smoke)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: in-worker, encode-role")
    parser.add_argument("--concurrency", default="", help="closed-loop points (default 4,16; 2 with --smoke)")
    parser.add_argument("--num-requests", type=int, default=0, help="per point (default 48; 6 with --smoke)")
    parser.add_argument("--warmup", type=int, default=4, help="requests before the points, concurrency 2")
    parser.add_argument("--image-fraction", type=float, default=0.5, help="share of image requests")
    parser.add_argument(
        "--image-size", default="", help="WIDTHxHEIGHT (default 448x448; 112x112 with --smoke)"
    )
    parser.add_argument(
        "--text-tokens", type=int, default=0, help="text tokens (default 100; 32 with --smoke)"
    )
    parser.add_argument(
        "--output-len", type=int, default=0, help="tokens per request (default 128; 4 with --smoke)"
    )
    parser.add_argument("--worker-args", default="", help="more `tandem worker` options, every worker")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/mm_serving_<device>_<date>.json)"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.concurrency = [int(c) for c in (args.concurrency or ("2" if args.smoke else "4,16")).split(",") if c]
    args.num_requests = args.num_requests or (6 if args.smoke else 48)
    args.image_width, args.image_height = parse_size(
        args.image_size or ("112x112" if args.smoke else "448x448")
    )
    args.text_tokens = args.text_tokens or (32 if args.smoke else 100)
    args.output_len = args.output_len or (4 if args.smoke else 128)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not 0.0 <= args.image_fraction <= 1.0:
        parser.error(f"--modes takes {', '.join(MODES)}; --image-fraction is in [0, 1]")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke (or --device cpu) for the CPU check", file=sys.stderr)
            return 2
    shape = "tiny" if args.smoke else "Qwen2.5-VL-7B"
    device_name = device_label(args.device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mm_serving_") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = make_model_dir(tmp / "model", TINY if args.smoke else QWEN2_5_VL_7B, shared_dir())
        words = one_token_words(model_dir)
        num_image_tokens = image_tokens(model_dir, args.image_width, args.image_height)
        print(
            f"{shape} (dummy weights) on {device_name}: {args.image_width}x{args.image_height} images "
            f"({num_image_tokens} tokens) + {args.text_tokens} text tokens in {args.image_fraction:.0%} of "
            f"the requests, {args.output_len} output tokens, concurrency {args.concurrency}",
            flush=True,
        )
        fields: dict[str, Any] = {
            "shape": shape,
            "image_size": [args.image_width, args.image_height],
            "image_tokens": num_image_tokens,
            "text_tokens": args.text_tokens,
            "output_len": args.output_len,
            "image_fraction": args.image_fraction,
            "num_requests": args.num_requests,
            "modes": results,
        }

        def save() -> Path:
            fields["encode_role_over_in_worker"] = ratios(results)
            out = write_report("mm_serving", device_name, args.smoke, args.out, fields)
            return out

        failed = False
        for mode in modes:
            results[mode] = {"points": []}
            try:
                run_mode(mode, model_dir, args, words, num_image_tokens, tmp, results[mode], save)
            except Exception as exc:  # the other mode still runs; the report says what failed
                failed = True
                results[mode]["error"] = repr(exc)[-4000:]
                print(f"{mode} failed: {exc!r}"[-4000:], file=sys.stderr, flush=True)
            save()
    print_table(results, fields["encode_role_over_in_worker"])
    print(f"wrote {save()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
