"""Every example in README.md and docs/*.md runs as typed.

Each fenced ```bash / ```python block is an example. A block either runs here or is preceded by
`<!-- not run by tests: REASON -->` (Docker, Kubernetes, a GPU, placeholder hosts, ...).

The blocks of one document run in order, as a reader would type them, in one session:
- a `.venv/bin/tandem up|worker|styler|gateway ... &` line starts that service (the test waits
  until it is ready: `/health` 200 for `up`, the gRPC health check for the others) and it keeps
  running until the document's last block;
- the rest of a bash block runs with `bash -e` (`grpcurl` is the one the dev extras ship); its
  output must not carry an error envelope;
- a python block runs with the venv's python (after the document's earlier python blocks when it
  uses their `client`).
Ports written in a document (8000, 50051, ...) are mapped to free ports for its session, and
`.venv/bin` is not on PATH: a bare `tandem` in an example fails here as it would for a reader.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.healthcheck import check_grpc

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!-- not run by tests: (.+?) -->\s*$")
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
SERVICE_LINE = re.compile(r"^\s*\.venv/bin/tandem (up|worker|styler|gateway)\b(.*?)&\s*$", re.M)
PORT = re.compile(r"(?:(?<=127\.0\.0\.1:)|(?<=localhost:)|(?<=--port )|(?<=--grpc-port ))(\d{2,5})\b")
READY_TIMEOUT_S = 180.0
COMMAND_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "bash" | "python"
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def examples(doc: Path) -> list[Example]:
    text = doc.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = SKIP_MARK.search(before)
        found.append(Example(doc, line, match.group(1), match.group(2), mark.group(1) if mark else None))
    return found


ALL = [ex for doc in DOCUMENTS for ex in examples(doc)]
RUNNABLE_DOCS = sorted({ex.doc for ex in ALL if ex.skip_reason is None}, key=str)


def test_every_example_runs_or_says_why() -> None:
    assert len(ALL) >= 15, f"only {len(ALL)} examples found: the parser is broken"
    run = [ex for ex in ALL if ex.skip_reason is None]
    assert len(run) >= 10, [ex.where for ex in run]
    for ex in ALL:
        assert ex.skip_reason is None or len(ex.skip_reason) > 10, ex.where
        # the examples call the CLI the way the set-up installs it
        assert not re.search(r"^\s*tandem ", ex.code, re.M), (
            f"{ex.where}: bare `tandem` (use .venv/bin/tandem)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DocSession:
    """Runs one document's examples in order; owns the services they start."""

    def __init__(self, doc: Path, tmp: Path) -> None:
        self.doc = doc
        self.tmp = tmp
        self.ports: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.python_blocks: list[str] = []
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.endswith(".venv/bin")]
        self.env = {**os.environ, "PATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
        self.env.pop("VIRTUAL_ENV", None)

    def rewrite(self, code: str) -> str:
        def port(m: re.Match[str]) -> str:
            return self.ports.setdefault(m.group(1), str(_free_port()))

        code = PORT.sub(port, code)
        return re.sub(r"(?m)^(\s*)grpcurl ", rf"\1{shlex.quote(str(ROOT / '.venv/bin/grpcurl'))} ", code)

    def run(self, ex: Example) -> None:
        code = self.rewrite(ex.code).replace("\\\n", " ")  # continuation lines: one command
        if ex.lang == "python":
            self._python(ex, code)
            return
        for service in SERVICE_LINE.finditer(code):
            self._start(ex, service.group(1), service.group(0).strip().rstrip("&").strip())
        rest = SERVICE_LINE.sub("", code)
        if not rest.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in rest.split("\n")):
            return
        out = self._check(ex, ["bash", "-e", "-o", "pipefail", "-c", rest])
        assert '"error"' not in out, f"{ex.where}: an example answered an error:\n{out[-2000:]}"

    def _python(self, ex: Example, code: str) -> None:
        if "client." in code and "client =" not in code:
            code = "\n".join([*self.python_blocks, code])
        self.python_blocks.append(code)
        script = self.tmp / f"example_{ex.line}.py"
        script.write_text(code)
        self._check(ex, [str(ROOT / ".venv/bin/python"), str(script)])

    def _check(self, ex: Example, argv: list[str]) -> str:
        done = subprocess.run(
            argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{ex.where} exited {done.returncode}:\n{out[-3000:]}\n{self._logs()}"
        return out

    def _start(self, ex: Example, kind: str, line: str) -> None:
        log = (self.tmp / f"{kind}_{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            shlex.split(line), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        argv = shlex.split(line)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{ex.where}: `{line}` exited {proc.returncode}\n{self._logs()}"
            if self._ready(kind, argv):
                return
            time.sleep(0.2)  # polling a condition: the service is ready or has died
        raise AssertionError(f"{ex.where}: `{line}` not ready in {READY_TIMEOUT_S}s\n{self._logs()}")

    def _ready(self, kind: str, argv: list[str]) -> bool:
        if kind == "up" or kind == "gateway":
            port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False
        # the container health check's own probe, in this process: a probe process every 0.2 s
        # would take the CPU the starting service needs
        return check_grpc(argv[argv.index("--address") + 1], timeout_s=2.0) is None

    def _logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log")
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_examples_run_as_typed(doc: Path, tmp_path: Path) -> None:
    session = DocSession(doc, tmp_path)
    try:
        for ex in examples(doc):
            if ex.skip_reason is None:
                session.run(ex)
    finally:
        session.close()
