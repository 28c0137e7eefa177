"""A container health check: `python -m services.common.healthcheck [TARGET]`.

Exit 0 when TARGET is healthy, 1 otherwise (one line on stderr says why). TARGET is either a
gRPC address (`host:port` or `unix:/path`), checked with the standard `grpc.health.v1` protocol
(status SERVING), or an `http://` URL (the gateway's `/health`), which must answer 2xx.

Without TARGET it uses $TANDEM_HEALTHCHECK_TARGET, else it reads the `tandem` command line of
the container's main process (/proc/1/cmdline, or the first `tandem` process) to find the
service and its `--address` / `--port`, so one image-wide HEALTHCHECK serves every role.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import switches

GRPC_SERVICES = ("styler", "worker")


def check_grpc(address: str, timeout_s: float, service: str = "") -> str | None:
    """None when `address` reports SERVING, else the reason."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return f"{address}: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_http(url: str, timeout_s: float) -> str | None:
    """None when `url` answers 2xx, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def target_from_command(argv: Sequence[str], env: dict[str, str] | None = None) -> str | None:
    """The health target of a `... tandem <service> [options]` command line, or None."""
    env = env if env is not None else {}
    names = [Path(a).name for a in argv]
    for i, name in enumerate(names):
        if name == "gateway":
            rest = argv[i + 1 :]
            port = _option(rest, "--port") or env.get("TANDEM_PORT") or "8000"
            return f"http://127.0.0.1:{port}/health"
        if name in GRPC_SERVICES:
            rest = argv[i + 1 :]
            address = _option(rest, "--address") or env.get("TANDEM_ADDRESS")
            if address is None:
                return None
            if address.startswith("unix:"):
                return address
            host, _, port = address.rpartition(":")
            if host in ("0.0.0.0", "[::]", "::", ""):
                host = "127.0.0.1"
            return f"{host}:{port}"
    return None


def _process_commands() -> list[tuple[list[str], dict[str, str]]]:
    """Command lines and environments of this container's processes, PID 1 first."""
    pids = [
        "1",
        *sorted((p.name for p in Path("/proc").iterdir() if p.name.isdigit() and p.name != "1"), key=int),
    ]
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            raw_env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in raw_env if b"=" in e)
        found.append(([a.decode(errors="replace") for a in argv if a], env))
    return found


def discover_target() -> str | None:
    if switches.HEALTHCHECK_TARGET.value:
        return switches.HEALTHCHECK_TARGET.value
    for argv, env in _process_commands():
        if any(Path(a).name == "tandem" or a == "tandem" for a in argv[:3]):
            target = target_from_command(argv, env)
            if target:
                return target
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        timeout_s = switches.HEALTHCHECK_TIMEOUT.value
    except switches.SwitchError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    target = args[0] if args else discover_target()
    if not target:
        print("healthcheck: no target given and no tandem service found in this container", file=sys.stderr)
        return 1
    service = args[1] if len(args) > 1 else ""
    error = (
        check_http(target, timeout_s)
        if target.startswith(("http://", "https://"))
        else check_grpc(target, timeout_s, service)
    )
    if error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
