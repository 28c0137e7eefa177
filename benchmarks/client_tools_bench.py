"""The standard serving benchmark clients, unmodified, against `tandem up`.

Starts `tandem up` on a model (default: stories260K on the CPU), runs guidellm and aiperf against
its OpenAI API with a short, bounded load on loopback, prints one table and writes
`benchmarks/results/client_tools_<model>_<device>.json` with each tool's own figures and the
command it ran. Both tools are heavy and are not tandem dependencies:

    .venv/bin/pip install guidellm aiperf
    .venv/bin/python benchmarks/client_tools_bench.py [--model DIR] [--device cpu] [--requests 40]

A tool that fails (any failed request) makes the script exit 1: these clients must work as they
are, which is the point of running them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tandem up exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("tandem up did not become healthy")


def run_aiperf(base: str, model_name: str, tokenizer: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / "aiperf"
    cmd = [
        str(VENV_BIN / "aiperf"), "profile", "--model", model_name, "--url", base,
        "--endpoint-type", "chat", "--streaming", "--tokenizer", tokenizer,
        "--request-count", str(args.requests), "--concurrency", str(args.concurrency),
        "--synthetic-input-tokens-mean", str(args.prompt_tokens),
        "--output-tokens-mean", str(args.output_tokens), "--extra-inputs", "ignore_eos:true",
        "--artifact-dir", str(out),
    ]  # fmt: skip
    # aiperf 0.13 treats a local tokenizer path as a hub repo id when HF_HUB_OFFLINE is set.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    report = out / "profile_export_aiperf.json"
    if done.returncode != 0 or not report.exists():
        return {"tool": "aiperf", "ok": False, "command": cmd, "output": (done.stdout + done.stderr)[-4000:]}
    data = json.loads(report.read_text())
    errors = int((data.get("error_request_count") or {}).get("avg", 0) or 0)
    return {
        "tool": "aiperf",
        "ok": errors == 0 and data["request_count"]["avg"] == args.requests,
        "command": cmd,
        "requests": data["request_count"]["avg"],
        "errors": errors,
        "request_throughput": data["request_throughput"]["avg"],
        "output_tok_s": data["output_token_throughput"]["avg"],
        "ttft_ms_p50": data["time_to_first_token"]["p50"],
        "ttft_ms_p99": data["time_to_first_token"]["p99"],
        "itl_ms_p50": data["inter_token_latency"]["p50"],
        "itl_ms_p99": data["inter_token_latency"]["p99"],
    }


def run_guidellm(base: str, model_name: str, tokenizer: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / "guidellm"
    out.mkdir()
    report = out / "benchmarks.json"
    cmd = [
        str(VENV_BIN / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={base},model={model_name}",
        "--profile", f"kind=concurrent,streams={args.concurrency}",
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=out)
    if done.returncode != 0 or not report.exists():
        return {
            "tool": "guidellm",
            "ok": False,
            "command": cmd,
            "output": (done.stdout + done.stderr)[-4000:],
        }
    data = json.loads(report.read_text())
    bench = data["benchmarks"][0]
    totals = bench["metrics"].get("request_totals", {})
    metrics = bench["metrics"]

    def stat(name: str, key: str) -> float:
        return float(metrics[name]["successful"][key])

    errors = int(totals.get("errored", 0)) if totals else 0
    return {
        "tool": "guidellm",
        "ok": errors == 0 and int(totals.get("successful", 0)) == args.requests,
        "command": cmd,
        "requests": totals.get("successful"),
        "errors": errors,
        "request_throughput": stat("requests_per_second", "mean"),
        "output_tok_s": stat("output_tokens_per_second", "mean"),
        "ttft_ms_p50": stat("time_to_first_token_ms", "median"),
        "ttft_ms_p99": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p99"],
        "itl_ms_p50": stat("inter_token_latency_ms", "median"),
        "itl_ms_p99": metrics["inter_token_latency_ms"]["successful"]["percentiles"]["p99"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/stories260K"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each tool may run")
    parser.add_argument("--tools", default="guidellm,aiperf")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    model = Path(args.model).resolve()
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="client_tools_"))
    up = subprocess.Popen(
        [str(VENV_BIN / "tandem"), "up", "--model", str(model), "--device", args.device, "--port", str(port)],
        stdout=(work / "up.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    rows = []
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", up)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as reply:
            model_name = json.loads(reply.read())["data"][0]["id"]
        base = f"http://127.0.0.1:{port}"
        runners = {"guidellm": run_guidellm, "aiperf": run_aiperf}
        for tool in args.tools.split(","):
            if shutil.which(str(VENV_BIN / tool)) is None:
                rows.append(
                    {"tool": tool, "ok": False, "output": f"{tool} is not installed (pip install {tool})"}
                )
                continue
            rows.append(runners[tool](base, model_name, str(model), args, work))
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=60)

    header = f"{'tool':<9} {'ok':<3} {'req':>4} {'err':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15}"
    print(f"{model.name} on {args.device}, {args.requests} requests at concurrency {args.concurrency}, "
          f"{args.prompt_tokens} prompt / {args.output_tokens} output tokens")  # fmt: skip
    print(header)
    for r in rows:
        if "request_throughput" not in r:
            print(f"{r['tool']:<9} no   {r.get('output', '')[-600:]}")
            continue
        print(
            f"{r['tool']:<9} {'yes' if r['ok'] else 'no':<3} {r['requests']:>4} {r['errors']:>4} "
            f"{r['request_throughput']:>7.1f} {r['output_tok_s']:>9.0f} "
            f"{r['ttft_ms_p50']:>7.1f}/{r['ttft_ms_p99']:<8.1f} {r['itl_ms_p50']:>6.2f}/{r['itl_ms_p99']:<8.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"client_tools_{model.name}_{args.device}.json"
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path.write_text(json.dumps({"config": config, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
