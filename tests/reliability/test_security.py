"""Security on a `tandem up` stack with mutual TLS between the services, HTTPS on the gateway and
API keys from a file: unknown, certificate-less and plaintext gRPC clients are refused; a missing
or wrong key is 401; the 11th request over a 10-per-minute limit is 429; no key or prompt in logs."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import secure_channel_options

from .certs import Identity, make_pki
from .rstack import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SECRET_PROMPT = "purple elephant 4711"
KEYS = "sk-open-0123456789\nsk-ten-per-minute rpm=10   # limited\nsk-few-tokens tpm=20\n"


@dataclass
class SecureUp:
    process: subprocess.Popen[bytes]
    run_dir: Path
    url: str
    ident: Identity
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def _https_ok(url: str, ca: Path) -> bool:
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url + "/health", timeout=2, context=context) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def secure_up(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureUp]:
    folder = tmp_path_factory.mktemp("secure")
    ident = make_pki(folder / "pki", "tandem")
    key_file = folder / "keys.txt"
    key_file.write_text(KEYS)
    port = free_port()
    log_path = folder / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "tandem", "up",
                "--model", str(stories_dir), "--port", str(port), "--device", "cpu",
                "--run-dir", str(folder / "run"),
                "--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--tls-ca", str(ident.ca),
                "--ssl-certfile", str(ident.cert), "--ssl-keyfile", str(ident.key),
                "--worker-args", "--cpu-threads 1",
                "--gateway-args", f"--api-key-file {key_file}",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    up = SecureUp(process, folder / "run", f"https://localhost:{port}", ident, log_path)
    try:
        deadline = time.monotonic() + 120
        while not _https_ok(up.url, ident.ca):
            assert process.poll() is None, up.output()[-3000:]
            assert time.monotonic() < deadline, up.output()[-3000:]
            time.sleep(0.2)
        yield up
    finally:
        process.terminate()
        try:
            assert process.wait(60) == 0, up.output()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (
        grpc.aio.secure_channel(address, credentials, options=secure_channel_options(address))
        if credentials
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize("service", ["styler", "worker-0"])
async def test_mtls_refuses_plaintext_certless_and_unknown_clients(
    secure_up: SecureUp, tmp_path: Path, service: str
) -> None:
    address = f"unix:{secure_up.run_dir / (service + '.sock')}"
    cert, key, ca = secure_up.ident.read()
    impostor = make_pki(tmp_path, "impostor")  # a certificate from another CA
    icert, ikey, ica = impostor.read()
    assert await _health(address, None) != "SERVING"  # plaintext
    assert await _health(address, grpc.ssl_channel_credentials(root_certificates=ca)) != "SERVING"  # no cert
    wrong_ca = grpc.ssl_channel_credentials(root_certificates=ca, private_key=ikey, certificate_chain=icert)
    assert await _health(address, wrong_ca) != "SERVING"  # client cert signed by an unknown CA
    trusting_impostor = grpc.ssl_channel_credentials(
        root_certificates=ica, private_key=key, certificate_chain=cert
    )
    assert await _health(address, trusting_impostor) != "SERVING"  # the server is not who the client trusts
    good = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    assert await _health(address, good) == "SERVING"


async def test_https_and_api_keys_and_rate_limits(secure_up: SecureUp) -> None:
    context = ssl.create_default_context(cafile=str(secure_up.ident.ca))
    url = secure_up.url
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(url + "/v1/models") as reply:
            assert reply.status == 401
            assert (await reply.json())["error"]["code"] == "invalid_api_key"
        async with session.get(
            url + "/v1/models", headers={"Authorization": "Bearer sk-open-012345678"}
        ) as reply:
            assert reply.status == 401  # a prefix of a key is not a key
        async with session.get(url + "/health") as reply:
            assert reply.status == 200  # probes need no key
        body = {"prompt": SECRET_PROMPT, "max_tokens": 8}
        async with session.post(
            url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-open-0123456789"}
        ) as reply:
            assert reply.status == 200, await reply.text()
        limited = {"Authorization": "Bearer sk-ten-per-minute"}
        for _ in range(10):
            async with session.get(url + "/v1/models", headers=limited) as reply:
                assert reply.status == 200
        async with session.get(url + "/v1/models", headers=limited) as reply:
            assert reply.status == 429
            assert int(reply.headers["Retry-After"]) >= 1
            assert "requests per minute" in (await reply.json())["error"]["message"]
        few = {"Authorization": "Bearer sk-few-tokens"}
        async with session.post(url + "/v1/completions", json=body, headers=few) as reply:
            assert reply.status == 200  # this request uses more than 20 tokens ...
        async with session.post(url + "/v1/completions", json=body, headers=few) as reply:
            assert reply.status == 429  # ... so the next one is over the key's tokens per minute
            assert "tokens per minute" in (await reply.json())["error"]["message"]
    # Plain HTTP on the HTTPS port gets nowhere.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(url.replace("https", "http") + "/health") as reply:
                await reply.read()


def test_no_secret_or_prompt_in_logs(secure_up: SecureUp) -> None:
    output = secure_up.output()
    assert "tandem is serving" in output
    for secret in ("sk-open-0123456789", "sk-ten-per-minute", "sk-few-tokens", "PRIVATE KEY", SECRET_PROMPT):
        assert secret not in output
