"""Scenario 4 of BENCHMARKS.md through the gateway, unified vs disaggregated (scenario 6).

    python benchmarks/serving_bench.py --shape Qwen2-0.5B --tokenizer .benchmodel/qwen2.5 --device cuda
    python benchmarks/serving_bench.py --shape cpu-small --tokenizer ../shared/tokenizers/qwen2.5 \
        --device cpu --input-len 256 --output-len 32 --rates 1,2 --concurrency 1,4 --num-requests 16

For each mode (`inprocess`: the worker's engine in this process behind its asyncio bridge, no
gateway, styler or gRPC, the baseline of the split; `unified`: `tandem up` with one unified
worker; `disaggregated`: `tandem up --disaggregate`, one prefill and one decode worker sharing one
GPU when only one is visible) it sends random token-id prompts of
--input-len tokens asking --output-len tokens (ignore_eos, streamed over SSE to
/v1/completions): Poisson arrivals at each of --rates (requests/s), then a closed loop at each
of --concurrency. Per point: TTFT and ITL (time between SSE chunks) p50 / p99, output tok/s, and
goodput = requests/s that met TTFT <= 200 ms and a mean ITL <= 50 ms. With `inprocess` among the
modes, each other mode's points also carry the cost of the split: throughput as a fraction of
in-process and the added TTFT / ITL p50 and p99 (ms) at the same load point. JSON and a PNG of latency
against load under benchmarks/results/ (the plot needs matplotlib: `pip install -e .[dev]`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import spy_record  # noqa: E402
import ttft_timeline  # noqa: E402
from kv_transfer_bench import SHAPES, write_model  # noqa: E402

from services.common import gc_heap, metrics  # noqa: E402

TTFT_SLO_S = 0.200
ITL_SLO_S = 0.050


@dataclass
class Result:
    ok: bool = False
    start: float = 0.0  # time.perf_counter() when the request was sent
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    num_chunks: int = 0
    tokens: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _children(root: int) -> list[int]:
    """Every live descendant of `root` (from /proc; empty where there is no /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def _role(pid: int) -> str:
    """`styler`, `worker`, `gateway`, ... from a `python -m tandem <role>` command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    args = [a.decode(errors="replace") for a in argv]
    if "tandem" in args:
        i = args.index("tandem")
        if i + 1 < len(args):
            return args[i + 1]
    return ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (utime + stime of /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per service role (and this bench process: the client, and in `inprocess` mode
    the engine too) over one load point; divided by the wall time it is the number of cores each
    kept busy: a role near 1.0 is a single-threaded Python bottleneck."""

    def __init__(self, root: int | None) -> None:
        self.pids: dict[int, str] = {}
        if root is not None:
            self.pids = {pid: _role(pid) for pid in _children(root)}
            self.pids = {pid: role for pid, role in self.pids.items() if role}
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        totals: dict[str, float] = {"bench": time.process_time()}
        for pid, role in self.pids.items():
            totals[role] = totals.get(role, 0.0) + _cpu_seconds(pid)
        return totals

    def cores_busy(self, wall_s: float) -> dict[str, float]:
        end = self._sample()
        return {role: round((end[role] - self.start.get(role, 0.0)) / wall_s, 3) for role in end}


async def sse_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed OpenAI response (its `data:` lines, `[DONE]` left out)."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Result:
    res = Result()
    start = res.start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if res.num_chunks == 0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
                res.num_chunks += 1
        res.ok = True
    except Exception as exc:  # a failed request is counted, not fatal
        res.error = repr(exc)
    return res


def steady_tok_per_s(results: list[Result]) -> float | None:
    """Output tokens/s while a closed loop is full: between the first request's end (every slot
    was busy since the start) and the last request's start (after it the slots empty one by one).
    A short run's whole-run rate is mostly its ramp up and drain, where the split's first-token
    cost weighs; this is the rate a long run converges to. None when the window is empty."""
    ok = [r for r in results if r.ok and r.num_chunks]
    if len(ok) < 2:
        return None
    ends = [r.start + r.ttft + sum(r.itls) for r in ok]
    t0, t1 = min(ends), max(r.start for r in ok)
    if t1 <= t0:
        return None
    tokens = 0.0
    for r in ok:
        per_chunk = r.tokens / r.num_chunks  # (a chunk may carry several tokens)
        at = r.start + r.ttft
        tokens += per_chunk * (t0 <= at < t1)
        for gap in r.itls:
            at += gap
            tokens += per_chunk * (t0 <= at < t1)
    return tokens / (t1 - t0)


def burst_ttfts(results: list[Result], concurrency: int) -> tuple[list[float], list[float]]:
    """A closed loop's TTFTs split in two: its first `concurrency` requests (sent at once: the
    burst) and the rest (each sent as an earlier one ended, into a running batch)."""
    ok = sorted((r for r in results if r.ok and r.num_chunks), key=lambda r: r.start)
    first = sorted(results, key=lambda r: r.start)[:concurrency]
    cut = max((r.start for r in first), default=0.0)
    return [r.ttft for r in ok if r.start <= cut], [r.ttft for r in ok if r.start > cut]


def summarize(
    results: list[Result], duration: float, closed_loop: bool = False, concurrency: int | None = None
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    good = [r for r in ok if r.ttft <= TTFT_SLO_S and (statistics.mean(r.itls) if r.itls else 0) <= ITL_SLO_S]
    return {
        "num_requests": len(results),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration,
        "ttft_p50_ms": (pct(ttfts, 0.5) or 0) * 1e3,
        "ttft_p99_ms": (pct(ttfts, 0.99) or 0) * 1e3,
        "itl_p50_ms": (pct(itls, 0.5) or 0) * 1e3,
        "itl_p99_ms": (pct(itls, 0.99) or 0) * 1e3,
        "output_tok_per_s": sum(r.tokens for r in ok) / duration,
        # a closed loop's rate while full (steady_tok_per_s); None for Poisson arrivals
        "steady_tok_per_s": steady_tok_per_s(results) if closed_loop else None,
        # a closed loop's TTFT p50 of its first wave (sent at once) and of the requests after it
        **_burst_points(results, concurrency if closed_loop else None),
        "goodput_req_per_s": len(good) / duration,
        "slo_attainment": len(good) / max(len(results), 1),
    }


def _burst_points(results: list[Result], concurrency: int | None) -> dict[str, float | None]:
    if concurrency is None:
        return {"ttft_burst_p50_ms": None, "ttft_after_p50_ms": None}
    burst, after = burst_ttfts(results, concurrency)
    p_burst, p_after = pct(burst, 0.5), pct(after, 0.5)
    return {
        "ttft_burst_p50_ms": p_burst * 1e3 if p_burst is not None else None,
        "ttft_after_p50_ms": p_after * 1e3 if p_after is not None else None,
    }


# the gateway's counters of its shared streams (gateway/metrics.py), as "name{labels}" lines
STREAM_COUNTERS = (
    "tandem:gateway_worker_stream_messages_total",
    "tandem:gateway_worker_session_messages_total",
    "tandem:gateway_styler_stream_messages_total",
    "tandem:gateway_styler_session_messages_total",
)


# the worker's own request histograms (services/common/metrics.py), from its --metrics-port: from
# the request's arrival in the worker to its first scheduling, and to its first token sent
WORKER_HISTOGRAMS = {
    "queue": metrics.QUEUE_WAIT,
    "ttft": metrics.TIME_TO_FIRST_TOKEN,
    "itl": metrics.INTER_TOKEN_LATENCY,
}


async def worker_sums(session: aiohttp.ClientSession, url: str | None) -> dict[str, float]:
    """The worker's histogram sums and counts ("queue_sum", "queue_count", "ttft_sum", ...) from
    its /metrics at `url`; empty without a url or an answer."""
    if url is None:
        return {}
    try:
        async with session.get(url) as reply:
            return histogram_sums(await reply.text())
    except aiohttp.ClientError:
        return {}


def histogram_sums(text: str) -> dict[str, float]:
    """WORKER_HISTOGRAMS' sums and counts in a Prometheus text exposition, and the garbage
    collections' ("gc2_sum", "gc2_count": generation 2's)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith((f"{metrics.GC_PAUSE}_sum{{", f"{metrics.GC_PAUSE}_count{{")):
            generation = name.split('generation="', 1)[1].split('"', 1)[0]
            sums[f"gc{generation}_{name.split('{', 1)[0].rsplit('_', 1)[1]}"] = float(value)
        for key, metric in WORKER_HISTOGRAMS.items():
            if name in (f"{metric}_sum", f"{metric}_count"):
                sums[f"{key}_{name.rsplit('_', 1)[1]}"] = float(value)
    return sums


def gc_split(before: dict[str, float], after: dict[str, float]) -> dict[str, list[float]]:
    """A point's garbage collections by generation ("gen2": [collections, ms paused]) from two
    readings of `histogram_sums` (the worker's) or of `gc_readings` (this process's)."""
    split: dict[str, list[float]] = {}
    for key in sorted(after):
        if key.startswith("gc") and key.endswith("_count"):
            gen = key.removeprefix("gc").removesuffix("_count")
            count = after[key] - before.get(key, 0.0)
            paused = after[f"gc{gen}_sum"] - before.get(f"gc{gen}_sum", 0.0)
            if count > 0:
                split[f"gen{gen}"] = [int(count), round(paused * 1e3, 2)]
    return split


def gc_readings() -> dict[str, float]:
    """This process's garbage collections so far, keyed as `histogram_sums` keys the worker's."""
    readings: dict[str, float] = {}
    for gen, (count, seconds) in gc_heap.pause_totals().items():
        readings[f"gc{gen}_count"], readings[f"gc{gen}_sum"] = float(count), seconds
    return readings


def worker_split(
    before: dict[str, float], after: dict[str, float], results: list[Result]
) -> dict[str, float]:
    """Where a point's mean TTFT went (ms): in the worker (`queue`: arrival to first scheduled;
    `ttft`: arrival to first token sent) and outside it (`outside`: the client's mean TTFT less
    the worker's: the gateway, the styler, the streams and the client); and the mean gap between
    tokens as the worker saw them (`itl`) beside the client's mean gap between chunks
    (`client_itl`): equal when the split only delays the tokens, larger when the path falls
    behind the engine. The client's TTFT is its first chunk: random token ids whose text stays
    incomplete UTF-8 until a late token (held back by the detokenizer) raise its mean, so its
    p50 is given beside it."""
    means: dict[str, float] = {}
    for key in WORKER_HISTOGRAMS:
        count = after.get(f"{key}_count", 0.0) - before.get(f"{key}_count", 0.0)
        if count > 0:
            means[key] = (after[f"{key}_sum"] - before.get(f"{key}_sum", 0.0)) / count * 1e3
    ok = [r.ttft for r in results if r.ok]
    if "ttft" in means and ok:
        means["client_ttft"] = statistics.mean(ok) * 1e3
        means["outside"] = means["client_ttft"] - means["ttft"]
        means["client_ttft_p50"] = statistics.median(ok) * 1e3
    gaps = [gap for r in results if r.ok for gap in r.itls]
    if "itl" in means and gaps:
        means["client_itl"] = statistics.mean(gaps) * 1e3
    return {k: round(v, 2) for k, v in means.items()}


async def stream_counts(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The gateway's GenerateMany / DetokenizeMany message counters from its /metrics (url: the
    gateway's, or its /v1/completions; empty when it does not answer):
    "worker_stream_messages{direction=sent}" and so on."""
    try:
        async with session.get(url.split("/v1/")[0] + "/metrics") as reply:
            text = await reply.text()
    except aiohttp.ClientError:
        return {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(STREAM_COUNTERS):
            key = name.removeprefix("tandem:gateway_").replace("_total", "").replace('"', "")
            counts[key] = float(value)
    return counts


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a point's repeated runs, the one with the median output tokens/s (the lower middle of
    an even count), with every run's rates beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tok_per_s"])
    point = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        point["repeats_tok_per_s"] = [r["output_tok_per_s"] for r in runs]
        point["repeats_steady_tok_per_s"] = [r["steady_tok_per_s"] for r in runs]
    return point


async def run_load(
    target: str | InProcessTarget,
    model: str,
    args: argparse.Namespace,
    rate: float | None,
    concurrency: int | None,
    vocab: int,
    repeat: int = 0,
) -> dict[str, Any]:
    """One load point against a URL (through the gateway) or the in-process engine."""
    # Fresh prompts for every load point and repeat (no prefix-cache hit from an earlier point,
    # run or the warm-up), the same ones in both modes.
    seed = f"{args.input_len}-{rate}-{concurrency}-{args.num_requests}" + (f"-{repeat}" if repeat else "")
    rng = random.Random(seed)

    def body() -> dict[str, Any]:
        prompt = [rng.randrange(3, min(vocab, 150_000)) for _ in range(args.input_len)]
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    timeout = aiohttp.ClientTimeout(total=600)
    meter = CpuMeter(args.up_pid)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        streams_before = None if isinstance(target, InProcessTarget) else await stream_counts(session, target)
        worker_url = None if isinstance(target, InProcessTarget) else getattr(args, "worker_metrics", None)
        worker_before = await worker_sums(session, worker_url)
        gc_before = gc_readings() if isinstance(target, InProcessTarget) else worker_before

        async def one(body: dict[str, Any]) -> Result:
            if isinstance(target, InProcessTarget):
                return await target.one_request(body)
            return await one_request(session, target, body)

        start = time.perf_counter()
        if rate is not None:
            tasks = []
            for _ in range(args.num_requests):
                tasks.append(asyncio.create_task(one(body())))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        else:
            assert concurrency is not None
            queue = [body() for _ in range(args.num_requests)]
            results = []

            async def loop() -> None:
                while queue:
                    results.append(await one(queue.pop()))

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        duration = time.perf_counter() - start
        streams = None
        if streams_before is not None:
            after = await stream_counts(session, target)  # type: ignore[arg-type]
            streams = {k: after.get(k, 0.0) - v for k, v in streams_before.items()}
        worker_after = await worker_sums(session, worker_url)
        gc_after = gc_readings() if isinstance(target, InProcessTarget) else worker_after
    point = summarize(results, duration, closed_loop=rate is None, concurrency=concurrency)
    if streams:  # the gateway's shared streams over the point: how much each message carried
        point["streams"] = streams
    if gc_after:  # the engine's process's garbage collections over the point (the worker's, or this one's)
        point["gc"] = gc_split(gc_before, gc_after)
    if worker_after:  # the mean TTFT split at the worker's door (one unified worker)
        point["worker_ms"] = worker_split(worker_before, worker_after, results)
    if args.per_request:  # each request's moments: (sent, first token, last token) in ms from the start
        point["requests_ms"] = [
            [
                round((r.start - start) * 1e3, 2),
                round(r.ttft * 1e3, 2),
                round((r.ttft + sum(r.itls)) * 1e3, 2),
            ]
            for r in sorted(results, key=lambda r: r.start)
            if r.ok
        ]
    point["cores_busy"] = meter.cores_busy(duration)
    # CPU time per output token, per role: the services' cost per token, which sharing the machine
    # with other load changes less than throughput
    num_tokens = point["output_tok_per_s"] * duration
    point["cpu_us_per_token"] = {
        role: round(busy * duration / num_tokens * 1e6) if num_tokens else 0
        for role, busy in point["cores_busy"].items()
    }
    point["rate"] = rate
    point["concurrency"] = concurrency
    return point


class InProcessTarget:
    """The engine behind its asyncio bridge in this process: the same requests, no services."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        from services.common.config import parse_config
        from services.worker.async_engine import AsyncEngine
        from services.worker.config import WorkerConfig
        from services.worker.engine import Engine

        argv = ["--model", str(model_dir), "--device", args.device, *shlex.split(_worker_args(args))]
        self.engine = AsyncEngine(Engine(parse_config(WorkerConfig, argv, "serving_bench")))
        self.engine.start()
        gc_heap.freeze_startup_heap()  # as the worker does once ready (TANDEM_GC_FREEZE)
        self.count = 0

    async def one_request(self, body: dict[str, Any]) -> Result:
        from services.worker.request import EngineRequest, SamplingParams

        res = Result()
        self.count += 1
        req = EngineRequest(
            request_id=f"bench-{self.count}",
            prompt_token_ids=tuple(body["prompt"]),
            sampling=SamplingParams(temperature=0.0, max_tokens=body["max_tokens"], ignore_eos=True),
        )
        start = last = res.start = time.perf_counter()
        outputs = self.engine.submit(req)
        while True:
            out = await outputs.get()
            if isinstance(out, BaseException):
                res.error = repr(out)
                return res
            if out.error:
                res.error = out.error
                return res
            if any(c.token_ids for c in out.choices):
                now = time.perf_counter()
                if res.num_chunks == 0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
                res.num_chunks += 1
                res.tokens += sum(len(c.token_ids) for c in out.choices)
            if out.finished:
                res.ok = True
                return res

    def close(self) -> None:
        self.engine.stop()


def _worker_args(args: argparse.Namespace) -> str:
    return f"--load-format dummy --max-model-len {args.input_len + args.output_len + 64} {args.worker_args}"


def start_up(
    model_dir: Path, mode: str, args: argparse.Namespace, log: Path, spans: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`tandem up` for `mode`; with `spans`, its services trace every request to that file."""
    port = free_port()
    worker_args = _worker_args(args)
    args.worker_metrics = None
    if mode != "disaggregated" and args.unified_workers == 1 and "--metrics-port" not in worker_args:
        metrics_port = free_port()  # the worker's own histograms (worker_split)
        worker_args += f" --metrics-port {metrics_port}"
        args.worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    argv = [sys.executable, "-m", "tandem", "up", "--model", str(model_dir), "--port", str(port)]
    argv += ["--device", args.device, "--worker-args", worker_args, "--startup-timeout", "600"]
    argv += shlex.split(args.up_args)
    if mode == "disaggregated":
        argv.append("--disaggregate")
    else:
        argv += ["--workers", str(args.unified_workers)]
    env = {"TANDEM_TRACE_FILE": str(spans), "OTEL_TRACES_EXPORTER": "none"} if spans is not None else {}
    return launch_up(argv, port, log, 600, env)


def launch_up(
    argv: list[str], port: int, log: Path, timeout_s: float, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `tandem up` (argv, serving on port) with its output in log, and wait until its /health
    answers 200: (the process, its URL). Stopped again if it exits or is not healthy in time."""
    import urllib.request

    env = {
        **(extra_env or {}),
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tandem up exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    stop_up(proc)
    raise TimeoutError(log.read_text()[-4000:])


def stop_up(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (tandem up stops its children), then SIGKILL after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_py_spy(args: argparse.Namespace, mode: str, conc: int | None) -> list[subprocess.Popen[bytes]]:
    """With --py-spy DIR, sample every service process (and this one) during a closed-loop point
    of concurrency >= --py-spy-from (8): collapsed stacks per role in DIR (`py-spy record --format raw`)."""
    if not args.py_spy or conc is None or conc < args.py_spy_from:
        return []
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    pids = {os.getpid(): "bench"}
    if args.up_pid is not None:
        pids |= {pid: role for pid in _children(args.up_pid) if (role := _role(pid))}
    return [
        spy_record.record(
            args.py_spy_exe,
            pid,
            out / f"{mode}_{role}_{pid}_c{conc}{'_gil' if args.py_spy_gil else ''}.txt",
            250,
            args.py_spy_native,
            args.py_spy_gil,
        )
        for pid, role in pids.items()
    ]


def split_cost(results: dict[str, Any]) -> None:
    """What the services cost against the in-process engine, point by point (same load)."""
    base = {(p["rate"], p["concurrency"]): p for p in results["modes"].get("inprocess", [])}
    if not base:
        return
    print(
        f"{'mode':>13} {'load':>10} {'tok/s ratio':>11} {'steady':>7} {'+TTFT p50/p99 ms':>17} {'+ITL p50/p99 ms':>16}"
    )
    for mode, points in results["modes"].items():
        if mode == "inprocess":
            continue
        for p in points:
            b = base.get((p["rate"], p["concurrency"]))
            if b is None or not b["output_tok_per_s"]:
                continue
            steady = None
            if p.get("steady_tok_per_s") and b.get("steady_tok_per_s"):
                steady = p["steady_tok_per_s"] / b["steady_tok_per_s"]
            cost = {
                "throughput_ratio": p["output_tok_per_s"] / b["output_tok_per_s"],
                "steady_throughput_ratio": steady,
                **{
                    f"added_{k}": p[k] - b[k]
                    for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
                },
            }
            p["split_cost"] = cost
            load = f"rate {p['rate']}" if p["rate"] is not None else f"conc {p['concurrency']}"
            print(
                f"{mode:>13} {load:>10} {cost['throughput_ratio']:>11.3f} "
                f"{'-' if steady is None else f'{steady:.3f}':>7} "
                f"{cost['added_ttft_p50_ms']:>8.2f}/{cost['added_ttft_p99_ms']:<8.2f} "
                f"{cost['added_itl_p50_ms']:>7.2f}/{cost['added_itl_p99_ms']:<8.2f}"
            )


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (key, label) in enumerate(
        (("rate", "offered load (req/s, Poisson)"), ("concurrency", "concurrency"))
    ):
        for mode, points in results["modes"].items():
            pts = [p for p in points if p[key] is not None]
            xs = [p[key] for p in pts]
            for row, metric in enumerate(("ttft", "itl")):
                ax = axes[row][col]
                ax.plot(xs, [p[f"{metric}_p50_ms"] for p in pts], "o-", label=f"{mode} p50")
                ax.plot(xs, [p[f"{metric}_p99_ms"] for p in pts], "x--", label=f"{mode} p99")
                ax.set_xlabel(label)
                ax.set_ylabel(f"{metric.upper()} (ms)")
                ax.axhline((TTFT_SLO_S if metric == "ttft" else ITL_SLO_S) * 1e3, color="grey", lw=0.8)
                ax.legend(fontsize=7)
    fig.suptitle(
        f"scenario 4: {results['shape']} {results['input_len']} in / {results['output_len']} out on {results['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "qwen2.5"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="unified,disaggregated")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rates", default="2,8,16,32")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each load point (fresh prompts each); the one with the median tok/s is reported",
    )
    ap.add_argument("--worker-args", default="")
    ap.add_argument(
        "--up-args", default="", help="more options of `tandem up` (e.g. '--routing affinity': no KV events)"
    )
    ap.add_argument(
        "--unified-workers",
        type=int,
        default=1,
        help="unified workers (spread over the GPUs); 2 on a 2-GPU machine compares equal hardware",
    )
    ap.add_argument(
        "--py-spy", default="", help="directory: sample the services with py-spy at concurrency >= 8"
    )
    ap.add_argument(
        "--py-spy-from", type=int, default=8, help="--py-spy: the lowest concurrency sampled (default 8)"
    )
    ap.add_argument(
        "--py-spy-native",
        action="store_true",
        help="--py-spy: native frames too (py-spy record --native; the processes pause per sample)",
    )
    ap.add_argument(
        "--per-request",
        action="store_true",
        help="each load point's JSON also lists every request's send time, TTFT and end (requests_ms)",
    )
    ap.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="--py-spy: only the thread holding the GIL at each sample (py-spy record --gil): which "
        "thread holds each process's GIL, the worker's engine thread against its event loop",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="trace every request through tandem up (TANDEM_TRACE_FILE) and print where the first "
        "token's time goes between the services (ttft_timeline.py; run at --concurrency 1)",
    )
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--plot-only", default="", help="redraw the PNG of an existing JSON")
    args = ap.parse_args()
    if args.plot_only:
        path = Path(args.plot_only)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    args.py_spy_exe = (
        spy_record.find_py_spy() if args.py_spy else ""
    )  # before any load: a missing one ends the run now
    tag = args.tag or f"{args.shape}_{args.device.split(':')[0]}"
    out = Path(args.out_dir) / f"serving_{tag}.json"
    results: dict[str, Any] = {
        "shape": args.shape,
        "device": args.device,
        "unified_workers": args.unified_workers,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "slo": {"ttft_ms": TTFT_SLO_S * 1e3, "mean_itl_ms": ITL_SLO_S * 1e3},
        "modes": {},
    }
    vocab = SHAPES[args.shape]["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.shape, Path(args.tokenizer))
        for mode in args.modes.split(","):
            log = Path(tmp) / f"up-{mode}.log"
            inprocess = InProcessTarget(model_dir, args) if mode == "inprocess" else None
            spans = Path(tmp) / f"spans-{mode}.jsonl" if args.trace and not inprocess else None
            proc, url = (None, "") if inprocess else start_up(model_dir, mode, args, log, spans)
            args.up_pid = proc.pid if proc is not None else None
            target: str | InProcessTarget = inprocess or url + "/v1/completions"
            points = []
            try:
                model = args.shape
                asyncio.run(
                    run_load(
                        target,
                        model,
                        argparse.Namespace(**{**vars(args), "num_requests": 4}),
                        None,
                        2,
                        vocab,
                    )
                )  # warm-up
                loads: list[tuple[float | None, int | None]] = [
                    (float(r), None) for r in args.rates.split(",") if r
                ]
                loads += [(None, int(c)) for c in args.concurrency.split(",") if c]
                for rate, conc in loads:
                    spies = start_py_spy(args, mode, conc)
                    # --repeats runs of the point (fresh prompts each), the median by tok/s kept
                    runs = [
                        asyncio.run(run_load(target, model, args, rate, conc, vocab, repeat))
                        for repeat in range(args.repeats)
                    ]
                    spy_record.stop(spies)
                    point = median_run(runs)
                    points.append(point)
                    print(
                        f"{mode:>13} rate={rate!s:>5} conc={conc!s:>4}: TTFT p50/p99 {point['ttft_p50_ms']:.1f}/"
                        f"{point['ttft_p99_ms']:.1f} ms"
                        + (
                            f" (first wave / after: {point['ttft_burst_p50_ms']:.1f} / {point['ttft_after_p50_ms']:.1f})"
                            if point.get("ttft_burst_p50_ms") is not None
                            and point.get("ttft_after_p50_ms") is not None
                            else ""
                        )
                        + f", ITL p50/p99 {point['itl_p50_ms']:.1f}/{point['itl_p99_ms']:.1f} ms, "
                        f"{point['output_tok_per_s']:.0f} tok/s"
                        + (f" ({point['steady_tok_per_s']:.0f} full)" if point["steady_tok_per_s"] else "")
                        + f", goodput {point['goodput_req_per_s']:.2f} req/s, "
                        f"failed {point['num_failed']}, cores busy {point['cores_busy']}, "
                        f"CPU us/token {point['cpu_us_per_token']}"
                        + (
                            f", mean TTFT at the worker (ms) {point['worker_ms']}"
                            if point.get("worker_ms")
                            else ""
                        )
                        + (f", engine process gc [count, ms] {point['gc']}" if point.get("gc") else ""),
                        flush=True,
                    )
            finally:
                if inprocess is not None:
                    inprocess.close()
                else:
                    assert proc is not None
                    stop_up(proc)
                if log.exists() and "fetched KV" in log.read_text():
                    fetch_lines = [ln for ln in log.read_text().splitlines() if "fetched KV" in ln]
                    results.setdefault("fetch_samples", {})[mode] = fetch_lines[-3:]
            results["modes"][mode] = points
            if spans is not None and spans.exists():
                lines = ttft_timeline.timelines(
                    [json.loads(line) for line in spans.read_text().splitlines() if line.strip()]
                )
                if lines:
                    ttft_timeline.print_summary(lines)
                    results.setdefault("first_token_timeline_us", {})[mode] = dict(
                        ttft_timeline.summary(lines)
                    )
    split_cost(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
