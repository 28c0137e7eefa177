"""Issue #20's two KV-cache benchmarks through a real `tandem up`, on a multi-turn chat workload.

    python benchmarks/kv_cache_bench.py --shape Qwen2-0.5B --device cuda
    python benchmarks/kv_cache_bench.py --shape cpu-small --device cpu --conversations 16 \
        --concurrency 4 --system-words 256 --user-words 32 --output-len 16     (a CPU smoke run)

Workload: --system-prompts S shared system prompts and --conversations C conversations of --turns
turns (conversation c has system prompt c mod S). Turn t sends the system prompt, the t - 1
earlier user messages each followed by the assistant's actual reply to it, and a new user message,
to /v1/chat/completions (streamed, `stream_options.include_usage`, greedy, --output-len tokens with
ignore_eos). --concurrency K turns are in flight at once, taken from a FIFO of conversations: a
conversation goes back to the end of the queue when its turn ends, so the turns of different
conversations interleave and a conversation's next turn comes after those of the others.
Texts are random words that are one token each in the Qwen2 / Llama 3 tokenizers.

Per mode: TTFT p50 / p99 (send to the first streamed chunk with a choice), and the prefix-hit
rate = sum of usage.prompt_tokens_details.cached_tokens / sum of usage.prompt_tokens over every
turn (also over turns 2 and later alone: the first turn can hit only its system prompt).

Scenario `routing`: `tandem up --workers 2` with `--routing exact` (the gateway routes by the
workers' KV events) and then `--routing affinity` (least load with the prefix-affinity guess),
with the gateway's count of exact picks (`tandem:gateway_exact_routes_total`) and the turns each
worker got (`tandem:gateway_worker_requests_total`). --routing-kv-blocks bounds each worker's KV
cache (0: the worker sizes it from free memory).

Scenario `offload`: one worker whose device KV cache (--kv-blocks, via --kv-cache-memory) holds
about --concurrency sequences of the longest length, far less than all conversations' prefixes,
without and with a host tier (--kv-offload-memory, --offload-memory); with the worker's prefix-hit
tokens, host-tier hit tokens (`tandem:prefix_cache_host_hit_tokens`) and preemptions from its
/metrics over the measured run.

A table on stdout; JSON under --out-dir as kv_cache_<tag>.json (tag: --tag, else shape_device).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from kv_transfer_bench import SHAPES, write_model  # noqa: E402
from serving_bench import free_port, launch_up, pct, sse_chunks, stop_up  # noqa: E402

BLOCK_SIZE = 16  # the worker's default --block-size
# Common English words, each one token (with its leading space) in the Qwen2 and Llama 3 tokenizers.
_WORD_TEXT = (
    "the of and to in is that it for on with as was at by be this have from or one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used "
    "me man too any day same right look think also around another came come work three must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world going want "
    "school important until form food keep children feet land side without boy once animals life "
    "enough took sometimes four head above kind began almost live page got earth need far hand high "
    "year mother light parts country father let night following picture being study second eyes soon"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class Conversation:
    """One chat: which system prompt it starts from and its user messages, one per turn."""

    system: int
    user_messages: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    system_prompts: tuple[str, ...]
    conversations: tuple[Conversation, ...]

    @property
    def num_turns(self) -> int:
        return sum(len(c.user_messages) for c in self.conversations)


def make_workload(
    num_system: int,
    num_conversations: int,
    num_turns: int,
    system_words: int,
    user_words: int,
    seed: str = "kv_cache_bench",
) -> Workload:
    """The same texts for the same arguments: conversation c uses system prompt c mod num_system;
    every text is random WORDS, so that no two texts share a leading block by chance."""
    rng = random.Random(seed)

    def text(num_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(num_words))

    systems = tuple(f"You are assistant number {i}. {text(system_words)}" for i in range(num_system))
    conversations = tuple(
        Conversation(c % num_system, tuple(text(user_words) for _ in range(num_turns)))
        for c in range(num_conversations)
    )
    return Workload(systems, conversations)


def turn_messages(workload: Workload, conversation: int, replies: list[str]) -> list[dict[str, str]]:
    """The messages of `conversation`'s turn len(replies) + 1: the system prompt, each earlier user
    message followed by the assistant's reply to it, and the next user message."""
    conv = workload.conversations[conversation]
    messages = [{"role": "system", "content": workload.system_prompts[conv.system]}]
    for user, reply in zip(conv.user_messages, replies, strict=False):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": conv.user_messages[len(replies)]})
    return messages


@dataclass
class TurnResult:
    """One chat request: its TTFT (seconds) and usage; `reply` is the streamed text."""

    conversation: int
    turn: int  # 1-based
    ok: bool = False
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reply: str = ""
    error: str = ""


async def chat_turn(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], result: TurnResult
) -> None:
    """Send one streamed chat request and fill `result` (a failure is recorded, not raised)."""
    start = time.perf_counter()
    parts: list[str] = []
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return
                if chunk.get("choices"):
                    if not result.ttft_s:
                        result.ttft_s = time.perf_counter() - start
                    parts.append(chunk["choices"][0].get("delta", {}).get("content") or "")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.completion_tokens = usage["completion_tokens"]
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        result.reply = "".join(parts)
        result.ok = result.prompt_tokens > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except Exception as exc:  # a failed turn is counted, not fatal
        result.error = repr(exc)[:200]


async def run_conversations(
    url: str, model: str, workload: Workload, concurrency: int, output_len: int
) -> tuple[list[TurnResult], float]:
    """Every turn of every conversation, `concurrency` at a time in FIFO order of conversations
    (see the module docstring); a failed turn continues its conversation with an empty reply.
    Returns the turns in completion order and the wall time in seconds."""
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    for c in range(len(workload.conversations)):
        queue.put_nowait(c)
    replies: list[list[str]] = [[] for _ in workload.conversations]
    results: list[TurnResult] = []
    remaining = workload.num_turns
    chat_url = url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def slot() -> None:
            nonlocal remaining
            while (c := await queue.get()) is not None:
                result = TurnResult(c, len(replies[c]) + 1)
                body = {
                    "model": model,
                    "messages": turn_messages(workload, c, replies[c]),
                    "max_tokens": output_len,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                await chat_turn(session, chat_url, body, result)
                results.append(result)
                replies[c].append(result.reply)
                remaining -= 1
                if len(replies[c]) < len(workload.conversations[c].user_messages):
                    queue.put_nowait(c)
                elif remaining == 0:
                    for _ in range(concurrency):
                        queue.put_nowait(None)

        start = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return results, duration


def summarize(results: list[TurnResult], duration_s: float) -> dict[str, Any]:
    """Hit rates (cached / prompt tokens of the turns that succeeded, all turns and turns 2 and
    later) and TTFT p50 / p99 in ms (serving_bench.pct; 0 when no turn succeeded)."""
    ok = [r for r in results if r.ok]
    later = [r for r in ok if r.turn > 1]

    def hit_rate(turns: list[TurnResult]) -> float:
        prompt = sum(r.prompt_tokens for r in turns)
        return sum(r.cached_tokens for r in turns) / prompt if prompt else 0.0

    ttfts = [r.ttft_s for r in ok]
    return {
        "num_turns": len(results),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": hit_rate(ok),
        "hit_rate_after_first_turn": hit_rate(later),
        "ttft_p50_ms": (pct(ttfts, 0.5) or 0.0) * 1e3,
        "ttft_p99_ms": (pct(ttfts, 0.99) or 0.0) * 1e3,
        "longest_prompt_tokens": max((r.prompt_tokens for r in ok), default=0),
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: `name{labels}` -> value for every sample line."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                continue
    return samples


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return parse_metrics(reply.read().decode())


def metric_deltas(
    before: dict[str, float], after: dict[str, float], prefixes: tuple[str, ...]
) -> dict[str, float]:
    """after - before for the samples whose name starts with one of `prefixes`."""
    return {
        name: value - before.get(name, 0.0)
        for name, value in sorted(after.items())
        if name.startswith(prefixes)
    }


@dataclass(frozen=True)
class Mode:
    """One `tandem up` configuration to measure."""

    scenario: str  # routing | offload
    name: str  # exact | affinity | off | on
    up_args: tuple[str, ...]  # options of `tandem up` (besides model, port, device, worker args)
    worker_args: str  # its --worker-args
    worker_metrics_port: int = 0  # a single worker's --metrics-port (0: not scraped)


GATEWAY_METRICS = ("tandem:gateway_exact_routes_total", "tandem:gateway_worker_requests_total")
WORKER_METRICS = (
    "tandem:prefix_cache_host_hit_tokens",
    "tandem:prefix_cache_hits_total",
    "tandem:prefix_cache_queries_total",
    "tandem:preemptions",
    "tandem:kv_swapped_out_sequences",
)


def run_mode(
    mode: Mode, model_dir: Path, workload: Workload, args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    """Start `tandem up` for `mode`, warm it up (a workload of its own texts), run the workload and
    stop it: the summary, with the gateway's (and a single worker's) metric changes over the run."""
    port = free_port()
    argv = [sys.executable, "-m", "tandem", "up", "--model", str(model_dir), "--port", str(port)]
    argv += [
        "--device",
        args.device,
        "--worker-args",
        mode.worker_args,
        "--startup-timeout",
        "600",
        *mode.up_args,
    ]
    proc, url = launch_up(argv, port, log, 600)
    try:
        warmup = make_workload(1, args.concurrency, 2, 32, 8, seed="warm-up")
        asyncio.run(run_conversations(url, args.shape, warmup, args.concurrency, args.output_len))
        worker_url = f"http://127.0.0.1:{mode.worker_metrics_port}/metrics"
        gateway_before = scrape(url + "/metrics")
        worker_before = scrape(worker_url) if mode.worker_metrics_port else {}
        results, duration = asyncio.run(
            run_conversations(url, args.shape, workload, args.concurrency, args.output_len)
        )
        point = summarize(results, duration)
        point["gateway_metrics"] = metric_deltas(gateway_before, scrape(url + "/metrics"), GATEWAY_METRICS)
        if mode.worker_metrics_port:
            point["worker_metrics"] = metrics = metric_deltas(
                worker_before, scrape(worker_url), WORKER_METRICS
            )
            host_tokens = metrics.get("tandem:prefix_cache_host_hit_tokens", 0.0)
            point["host_hit_rate"] = host_tokens / point["prompt_tokens"] if point["prompt_tokens"] else 0.0
    finally:
        stop_up(proc)
    point |= {"scenario": mode.scenario, "mode": mode.name, "up_args": list(mode.up_args)}
    point["worker_args"] = mode.worker_args
    return point


def longest_prompt_estimate(args: argparse.Namespace) -> int:
    """Tokens of the last turn's prompt at most, with room for the chat template and for replies
    that tokenize longer than they were generated (random tokens detokenized and tokenized again)."""
    per_turn = args.user_words + 2 * args.output_len + 16
    return 32 + args.system_words + args.turns * per_turn


def kv_block_bytes(model_dir: Path, device: str) -> int:
    """Bytes of one KV block of the worker's default dtype (float32 on CPU, bfloat16 on GPU), by
    the worker's own formula (a --dtype or --kv-cache-dtype in --worker-args is not accounted for)."""
    import torch

    from services.worker.kv_cache import block_bytes
    from services.worker.model_config import load_model_config

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return block_bytes(load_model_config(str(model_dir)), BLOCK_SIZE, dtype)


def modes(args: argparse.Namespace, model_dir: Path, max_model_len: int) -> tuple[list[Mode], dict[str, Any]]:
    """The modes of the chosen scenarios and the KV sizes they were given."""
    base = f"--load-format dummy --max-model-len {max_model_len} {args.worker_args}".strip()
    block_bytes = kv_block_bytes(model_dir, args.device)
    sizes: dict[str, Any] = {"max_model_len": max_model_len, "kv_block_bytes": block_bytes}
    out: list[Mode] = []
    scenarios = args.scenarios.split(",")
    if "routing" in scenarios:
        routing_args = base
        if args.routing_kv_blocks:
            routing_args += f" --kv-cache-memory {args.routing_kv_blocks * block_bytes}"
            sizes["routing_kv_blocks"] = args.routing_kv_blocks
        for routing in ("exact", "affinity"):
            out.append(Mode("routing", routing, ("--workers", "2", "--routing", routing), routing_args))
    if "offload" in scenarios:
        blocks_per_seq = math.ceil(max_model_len / BLOCK_SIZE)
        kv_blocks = args.kv_blocks or args.concurrency * blocks_per_seq + 1
        # every conversation's prefix at its longest and the system prompts (the host tier gets twice that)
        prefix_blocks = args.conversations * blocks_per_seq + args.system_prompts * math.ceil(
            args.system_words / BLOCK_SIZE
        )
        offload = args.offload_memory or f"{math.ceil(2 * prefix_blocks * block_bytes / 2**20)}MiB"
        sizes |= {
            "kv_blocks": kv_blocks,
            "workload_prefix_blocks_at_most": prefix_blocks,
            "offload_memory": offload,
        }
        device_kv = f"{base} --kv-cache-memory {kv_blocks * block_bytes}"
        for name, extra in (("off", ""), ("on", f" --kv-offload-memory {offload}")):
            port = free_port()
            out.append(Mode("offload", name, (), f"{device_kv}{extra} --metrics-port {port}", port))
    return out, sizes


def print_table(points: list[dict[str, Any]]) -> None:
    """One row per mode: hit rates, TTFT, the gateway's exact picks (routing) and the worker's
    host-tier hits as a fraction of the prompt tokens and its preemptions (offload)."""
    print(
        f"{'scenario':>8} {'mode':>8} {'turns':>5} {'fail':>4} {'hit rate':>8} {'turn>1':>7} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'exact':>6} {'host hit':>8} {'preempt':>7}"
    )
    for p in points:
        gateway, worker = p.get("gateway_metrics", {}), p.get("worker_metrics", {})
        exact = gateway.get('tandem:gateway_exact_routes_total{pool="worker"}')
        exact_text = f"{int(exact)}" if exact is not None and p["scenario"] == "routing" else "-"
        host = p.get("host_hit_rate")
        preempt = worker.get("tandem:preemptions")
        print(
            f"{p['scenario']:>8} {p['mode']:>8} {p['num_turns']:>5} {p['num_failed']:>4} "
            f"{p['hit_rate']:>8.3f} {p['hit_rate_after_first_turn']:>7.3f} "
            f"{p['ttft_p50_ms']:>7.1f}ms {p['ttft_p99_ms']:>7.1f}ms {exact_text:>6} "
            f"{'-' if host is None else f'{host:.3f}':>8} {'-' if preempt is None else int(preempt):>7}"
        )


def default_tokenizer() -> Path:
    shared = Path(os.environ.get("TANDEM_SHARED", REPO.parent / "shared"))
    return shared / "tokenizers" / "qwen2.5"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", default=str(default_tokenizer()), help="a directory with a chat template")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenarios", default="routing,offload", help="comma-separated: routing, offload")
    ap.add_argument("--system-prompts", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8, help="turns in flight at once")
    ap.add_argument("--system-words", type=int, default=512, help="words (tokens) of each system prompt")
    ap.add_argument("--user-words", type=int, default=64, help="words (tokens) of each user message")
    ap.add_argument("--output-len", type=int, default=64, help="tokens of each assistant reply")
    ap.add_argument(
        "--routing-kv-blocks",
        type=int,
        default=0,
        help="routing: KV blocks per worker (0: the worker's sizing)",
    )
    ap.add_argument(
        "--kv-blocks",
        type=int,
        default=0,
        help="offload: the worker's device KV blocks (0: --concurrency sequences of the longest length)",
    )
    ap.add_argument(
        "--offload-memory",
        default="",
        help="offload: --kv-offload-memory of the `on` mode (empty: twice the workload's prefixes)",
    )
    ap.add_argument("--worker-args", default="", help="more options for every worker")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    unknown = set(args.scenarios.split(",")) - {"routing", "offload"}
    if unknown:
        ap.error(f"--scenarios: unknown {', '.join(sorted(unknown))} (routing, offload)")
    tag = args.tag or f"{args.shape}_{args.device.split(':')[0]}"
    out = Path(args.out_dir) / f"kv_cache_{tag}.json"
    workload = make_workload(
        args.system_prompts, args.conversations, args.turns, args.system_words, args.user_words
    )
    max_model_len = BLOCK_SIZE * math.ceil((longest_prompt_estimate(args) + args.output_len) / BLOCK_SIZE)
    results: dict[str, Any] = {
        "shape": args.shape,
        "device": args.device,
        "workload": {
            name: getattr(args, name)
            for name in (
                "system_prompts",
                "conversations",
                "turns",
                "concurrency",
                "system_words",
                "user_words",
                "output_len",
            )
        },
        "points": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.shape, Path(args.tokenizer))
        chosen, sizes = modes(args, model_dir, max_model_len)
        results["kv"] = sizes
        print(f"workload: {workload.num_turns} turns; KV: {sizes}", flush=True)
        for mode in chosen:
            log = Path(tmp) / f"up-{mode.scenario}-{mode.name}.log"
            point = run_mode(mode, model_dir, workload, args, log)
            results["points"].append(point)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))  # after each mode: a cut-off run keeps its points
            print(
                f"{mode.scenario} {mode.name}: hit rate {point['hit_rate']:.3f}, TTFT p50/p99 "
                f"{point['ttft_p50_ms']:.1f}/{point['ttft_p99_ms']:.1f} ms, {point['duration_s']:.1f} s, "
                f"failed {point['num_failed']} {point['errors']}",
                flush=True,
            )
    print_table(results["points"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
