"""Start `tandem up` as a real process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float = 10) -> None:
    """SIGTERM every process, wait for them together, SIGKILL what is left after `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL (a crash, for failure tests) and reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            children.append(int(entry.name))
    return children


def children_by_role(pid: int) -> dict[str, int]:
    """`tandem up`'s children by the service they run (styler, worker, gateway)."""
    roles = {}
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:  # the child exited between listing and reading (e.g. just killed)
            continue
        for role in ("styler", "worker", "gateway"):
            if role.encode() in cmdline:
                roles[role] = child
    return roles


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


# Lowers the open-file soft limit, then execs the rest of argv: the limit is set in a fresh child,
# not in a `preexec_fn`, which runs in the fork of this (multi-threaded, gRPC-using) test process,
# where gRPC's fork handlers may abort the child before its exec.
_SOFT_LIMIT_EXEC = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def with_open_file_soft_limit(argv: list[str], soft: int | None) -> list[str]:
    """`argv` run with the open-file soft limit lowered to `soft` (None: as it is)."""
    return argv if soft is None else [sys.executable, "-c", _SOFT_LIMIT_EXEC, str(soft), *argv]


class UpProcess:
    """`tandem up` in a subprocess; `wait_healthy` polls the gateway's /health."""

    def __init__(
        self,
        model: Path,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        open_files_soft: int | None = None,
    ):
        self.port = port or free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-up-{self.port}.log"
        self.log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "tandem", "up", "--model", str(model), "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            with_open_file_soft_limit(argv, open_files_soft),
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tandem up exited with {self.process.returncode}:\n{self.output()[-3000:]}"
                )
            # `up` itself must have seen every child ready (the gateway's /health can turn 200 a
            # moment before `up`'s own probe does).
            if http_status(self.url + "/health") == 200 and "tandem is serving" in self.output():
                return
            time.sleep(0.2)
        raise TimeoutError(f"tandem up not healthy after {timeout_s}s:\n{self.output()[-3000:]}")

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return int(self.process.returncode)
