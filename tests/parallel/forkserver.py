"""Worker-group runs without a fresh interpreter for each process: most of a run's CPU was start-up
(every tp_generate.py run and every rank of its group imported torch and the worker again).

    python tests/parallel/forkserver.py     (started by `ForkServer`; JSON lines on stdin / stdout)

The server imports torch and the worker once, then forks a child per request that runs a script
of tests/parallel (tp_generate.py, tp_host_kv.py) as `__main__` with the request's argv,
environment and log file, as `python SCRIPT ARGS` would; it reports each child's pid, then its
exit code. In such a run, `fork_ranks` makes the group's ranks 1..T*P-1 forks of rank 0 (at the
point where RankProcesses spawns them, before the group starts any thread) that run
services.worker.main's `main` with the rank's environment, as `python -m services.worker.main`
would. Everything after the spawn is the code path of a group: rendezvous, weights, the engine and
`follow`. The real spawn of ranks (`tandem worker --tensor-parallel-size`, `tandem up`) is tested
by test_group_lifecycle.py, test_up_tensor_parallel.py and tests/disagg.

A fork is used only where it starts what an exec would: the server's environment equals the
request's (else `ForkServer.spawn` runs the script in a fresh interpreter), and the forking process
has one thread (else the ranks are spawned as usual).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).resolve()
# set by pytest for each test: not part of what a run is started with
_PER_TEST_ENV = ("PYTEST_CURRENT_TEST",)


def _one_thread() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def _run_as_main(
    run: Callable[[], int | None], argv0: str, argv: list[str], env: dict[str, str], log_fd: int | None
) -> None:
    """In a forked child: the environment, argv and stdio of a fresh `python` process, then `run`,
    then exit with its code (never returns)."""
    code = 1
    try:
        if log_fd is not None:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [argv0, *argv]
        try:
            result = run()
            code = 0 if result is None else int(result)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# --- ranks 1..T*P-1 as forks of rank 0 (in a run) --------------------------------------------


class ForkedRank:
    """What RankProcesses uses of a subprocess.Popen (pid, poll, wait, kill) for a forked child:
    one thread waits in waitpid at a time, as Popen's lock makes it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: its code is lost
            pid, status = self.pid, 255 << 8
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                if self.returncode is None:
                    self._reap(os.WNOHANG)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            with self._lock:
                if self.returncode is None:
                    self._reap(0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _RankSpawner:
    """Stands in for the `subprocess` module in services.worker.tp_group: a rank's command
    (`python -m services.worker.main ...`) is a fork running that module's `main`; anything else,
    or a fork from a process with threads, goes to subprocess as before."""

    def __init__(self) -> None:
        self.__dict__.update({k: v for k, v in vars(subprocess).items() if k not in ("Popen", "__name__")})

    def Popen(self, cmd: list[str], env: dict[str, str], preexec_fn: Callable[[], None]) -> Any:
        if cmd[:3] != [sys.executable, "-m", "services.worker.main"] or not _one_thread():
            return subprocess.Popen(cmd, env=env, preexec_fn=preexec_fn)
        argv = cmd[3:]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            preexec_fn()

            def run() -> int:
                from services.worker.main import main

                return main(argv, "tandem worker")

            _run_as_main(run, str(REPO / "services" / "worker" / "main.py"), argv, env, None)
        return ForkedRank(pid)


def fork_ranks() -> None:
    """In a run of tp_generate.py / tp_host_kv.py: the group's other ranks as forks (above)."""
    from services.worker import tp_group

    tp_group.subprocess = _RankSpawner()  # type: ignore[assignment]


# --- the server ------------------------------------------------------------------------------

PRELOAD = (
    "torch",
    "numpy",
    "safetensors.torch",
    "services.common.config",
    "services.worker.config",
    "services.worker.engine",
    "services.worker.tp_launch",
    "services.worker.tp_follow",
    "services.worker.main",
    "services.worker.async_engine",
    "services.worker.rpc",
    "services.worker.openengine_rpc",
    "services.worker.smg_rpc",
    "services.worker.block_manager",
    "services.worker.kv_offload",
    "services.worker.guided",
    "services.worker.models.llama",
    "services.worker.models.qwen2",
    "services.worker.models.qwen3",
    "services.worker.models.qwen3_moe",
    "services.worker.models.gpt_oss",
)


def serve() -> None:
    """The server's loop: one thread, so that every fork starts from a consistent state."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    requests = os.dup(0)
    replies = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # stray prints of the server go to its stderr, never into the replies
    os.close(null)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()

    def reply(message: dict[str, Any]) -> None:
        os.write(replies, (json.dumps(message) + "\n").encode())

    def reap() -> None:
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply({"pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def fork(request: dict[str, Any]) -> None:
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (wake_r, wake_w, replies, requests):
                os.close(fd)
            os.chdir(request["cwd"])
            script = request["script"]

            def run() -> None:
                runpy.run_path(script, run_name="__main__")  # its sys.exit ends the run

            _run_as_main(
                run,
                script,
                request["args"],
                request["env"],
                log_fd,
            )
        os.close(log_fd)
        children.add(pid)
        reply({"id": request["id"], "pid": pid})  # always before the child's exit code

    reply({"ready": True})
    pending = b""
    try:
        while True:
            readable, _, _ = select.select([requests, wake_r], [], [])
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            if requests in readable:
                data = os.read(requests, 65536)
                if not data:
                    break
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    fork(json.loads(line))
            reap()
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the client (the pytest process) ---------------------------------------------------------


class ForkedRun:
    """A run forked by the server: what GroupRun uses of a subprocess.Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.done = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.done.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class ForkServer:
    """The server process (started with `env`) and the thread that reads its replies."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self._lock = threading.Lock()
        self._next_id = 0
        self._spawned: dict[int, tuple[threading.Event, list[ForkedRun]]] = {}
        self._runs: dict[int, ForkedRun] = {}
        self._ready = threading.Event()
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, cwd=REPO, env=env,
            )  # fmt: skip
        threading.Thread(target=self._read, name="forkserver-replies", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._lock:
                if "ready" in message:
                    self._ready.set()
                elif "id" in message:  # a run's pid: always before its exit code
                    run = ForkedRun(message["pid"])
                    self._runs[run.pid] = run
                    event, box = self._spawned.pop(message["id"])
                    box.append(run)
                    event.set()
                else:
                    run = self._runs.pop(message["pid"])
                    run.returncode = message["code"]
                    run.done.set()
        with self._lock:  # the server is gone, and its children with it
            for run in self._runs.values():
                run.returncode = -signal.SIGKILL
                run.done.set()
            self._runs.clear()
            for event, _ in self._spawned.values():
                event.set()
            self._ready.set()

    def matches(self, env: dict[str, str]) -> bool:
        def strip(e: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in e.items() if k not in _PER_TEST_ENV}

        return strip(env) == strip(self.env)

    def spawn(self, script: Path, args: list[str], env: dict[str, str], log: Path) -> ForkedRun | None:
        """`python SCRIPT ARGS` forked from the server (stdout and stderr to `log`), or None when
        the server cannot start it as a fresh interpreter would (another environment, no server)."""
        if not self.matches(env) or not self._ready.wait(120) or self.proc.poll() is not None:
            return None
        assert self.proc.stdin is not None
        event = threading.Event()
        box: list[ForkedRun] = []
        with self._lock:
            self._next_id += 1
            self._spawned[self._next_id] = (event, box)
            request = {"id": self._next_id, "script": str(script), "args": args, "env": env}
            request.update(cwd=str(REPO), log=str(log))
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:
                return None
        event.wait(60)
        return box[0] if box else None

    def stop(self) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()  # the server kills what it still runs, then exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Shared:
    """This pytest process's server: tests/parallel/conftest.py sets `log_dir` for the session
    (test modules import the conftest under another name than pytest does, so it lives here)."""

    def __init__(self) -> None:
        self.server: ForkServer | None = None
        self.log_dir: Path | None = None

    def spawn(self, script: Path, args: list[str], env: dict[str, str], log: Path) -> ForkedRun | None:
        if self.log_dir is None:
            return None
        if self.server is None:
            self.server = ForkServer(env, self.log_dir / "server.log")
        return self.server.spawn(script, args, env, log)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None


SHARED = _Shared()


def run_env() -> dict[str, str]:
    """The environment of a group's script (tp_generate.py, tp_host_kv.py)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start_script(script: str, args: list[str], log: Path) -> Any:
    """`python tests/parallel/SCRIPT ARGS` in the group's environment, stdout and stderr to `log`:
    forked from the fork server where it can be, else a fresh interpreter. Returns a handle with
    subprocess.Popen's poll / wait / kill."""
    env = run_env()
    path = REPO / "tests" / "parallel" / script
    run = SHARED.spawn(path, args, env, log)
    if run is not None:
        return run
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(path), *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


if __name__ == "__main__":
    serve()
