"""`tandem up` as an operator meets it: a busy port, the `vllm serve` options, what its open
routes show, its run dir, descriptor limits, and children that die together."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.stack import REPO, UpProcess, alive, child_pids

pytestmark = pytest.mark.e2e


class _OtherServer(BaseHTTPRequestHandler):
    """Something already serving on the port, healthy like a tandem gateway would be."""

    def do_GET(self) -> None:
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_busy_port_is_a_one_line_error_before_anything_starts(stories_dir: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtherServer)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tandem", "up", "--model", str(stories_dir), "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert result.stdout == ""  # never "tandem is serving"
    assert result.stderr.strip().splitlines() == [
        f"tandem up: port {port} is already in use on 127.0.0.1 (--port); stop what listens there or pick another --port"
    ]


def _get(url: str, key: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _arg(pid: int, flag: str) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index(flag) + 1]


def _open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-files line")


def test_vllm_serve_options_health_run_dir_and_descriptor_limit(stories_dir: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    up = UpProcess(
        stories_dir,
        *("--served-model-name", "tiny", "--max-model-len", "64", "--max-num-seqs", "4"),
        *("--api-key", "sk-one", "--api-key", "sk-two"),
        # a distribution's default soft limit, inherited by the children
        open_files_soft=256 if hard == resource.RLIM_INFINITY or hard > 256 else None,
    )
    try:
        up.wait_healthy()
        assert _get(up.url + "/v1/models")[0] == 401
        status, body = _get(up.url + "/v1/models", "sk-two")
        assert status == 200
        card = json.loads(body)["data"][0]
        assert (card["id"], card["max_model_len"]) == ("tiny", 64)
        children = {
            Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3].decode(): pid
            for pid in child_pids(up.process.pid)
        }
        assert _arg(children["worker"], "--max-num-seqs") == "4"

        # /health is open: services by name and status, no socket paths
        run_dir = Path(_arg(children["styler"], "--address").removeprefix("unix:")).parent
        status, body = _get(up.url + "/health")
        health = json.loads(body)
        assert (
            status == 200
            and health["styler"] == {"styler-0": True}
            and health["worker"] == {"worker-0": True}
        )
        assert str(run_dir) not in body and str(run_dir) not in _get(up.url + "/metrics")[1]
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700

        for pid in children.values():  # every service raised its soft limit to the hard one
            soft_now, hard_now = _open_files_limit(pid)
            assert soft_now == hard_now, (pid, soft_now, hard_now)
    finally:
        assert up.stop() == 0, up.output()[-3000:]


def _children_by_name(up: UpProcess) -> dict[str, int]:
    """`up`'s children by their name in its log: styler, worker-0, worker-1, gateway."""
    names = {}
    for pid in child_pids(up.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--address" in argv:
            names[Path(argv[argv.index("--address") + 1]).stem] = pid
        elif "gateway" in argv:
            names["gateway"] = pid
    return names


def test_children_that_die_together_are_restarted_together(stories_dir: Path) -> None:
    up = UpProcess(stories_dir, "--workers", "2")
    try:
        up.wait_healthy()
        before = _children_by_name(up)
        dead = ["styler", "worker-0", "worker-1"]
        for name in dead:
            os.kill(before[name], signal.SIGKILL)
        deadline = time.monotonic() + 180
        while up.output().count("is serving again") < len(dead):
            assert time.monotonic() < deadline, up.output()[-3000:]
            assert up.process.poll() is None, up.output()[-3000:]
            time.sleep(0.2)
        log = up.output()
        first_ready = log.index("is serving again")
        # every restart began before the first restarted child was ready: none waited for another
        for name in dead:
            assert log.index(f"starting {name} again") < first_ready, log[-3000:]
        after = _children_by_name(up)
        assert all(after[name] != before[name] and alive(after[name]) for name in dead)
        assert after["gateway"] == before["gateway"]
    finally:
        assert up.stop() == 0, up.output()[-3000:]
