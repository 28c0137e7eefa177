"""tandem's Endpoint Picker (gateway/epp.py) driven over Envoy ext-proc as Envoy drives it.

A styler and two real workers (stories260K) on 127.0.0.1 and 127.0.0.2, so their pool endpoints
(`host:--endpoint-port`) differ; the picker runs in this process (its router's state is what the
tests wait on) or, once, as `tandem epp`. The client is the generated ExternalProcessor stub; it
sends request headers then the body in chunks (FULL_DUPLEX_STREAMED, what InferencePool gateways
configure) and reads the answers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.clients import StylerClient
from gateway.epp import DESTINATION_KEY, DESTINATION_NAMESPACE, SUBSET_KEY, SUBSET_NAMESPACE, EndpointPicker
from gateway.epp_main import EppConfig, start_epp
from gateway.router import Router
from services.common.block_hash import block_hashes
from services.common.server import GrpcServer, wait_for_serving
from tandem.ext_proc.envoy.config.core.v3 import base_pb2
from tandem.ext_proc.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from tandem.ext_proc.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from tandem.ext_proc.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import free_port, stop_processes
from tests.gateway.gateway_stack import REPO, _env
from tests.protocols.conftest import worker_args

HOSTS = ("127.0.0.1", "127.0.0.2")
ENDPOINT_PORT = 8000
CHAT = {
    "model": "stories260K",
    "messages": [
        {
            "role": "user",
            "content": "Once upon a time there was a little girl named Lily who loved to play in the park "
            "with her friends and her dog, and one day she found a big red ball under a tree.",
        }
    ],
    "max_tokens": 4,
}


@dataclass
class Pool:
    styler: str
    workers: list[str]


@pytest.fixture(scope="module")
def pool(
    request: pytest.FixtureRequest, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    if request.config.getoption("--target") is not None:
        pytest.skip("the picker routes to tandem workers of its own")
    run_dir = tmp_path_factory.mktemp("epp")
    styler = f"unix:{run_dir}/styler.sock"
    workers = [f"{host}:{free_port()}" for host in HOSTS]
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, args: Sequence[str]) -> None:
        log = open(run_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tandem", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=REPO,
            )
        )

    try:
        spawn("styler", ["styler", "--model", str(stories_dir), "--address", styler])
        for i, address in enumerate(workers):
            spawn(
                f"worker-{i}",
                ["worker", *worker_args(stories_dir, address)],
            )

        async def wait() -> None:
            await asyncio.gather(*(wait_for_serving(a, timeout_s=120) for a in [styler, *workers]))

        asyncio.run(wait())
        yield Pool(styler, workers)
    finally:
        stop_processes(procs)


@dataclass
class Epp:
    server: GrpcServer
    router: Router
    stub: ext_proc_grpc.ExternalProcessorStub


@pytest.fixture
async def epp(pool: Pool) -> AsyncIterator[Epp]:
    config = EppConfig(
        address="127.0.0.1:0",
        worker=pool.workers,
        styler=[pool.styler],
        endpoint_port=ENDPOINT_PORT,
        poll_interval=0.1,
    )
    server, router, stylers = await start_epp(config)
    await until(lambda: all(router.kv_index.live(a) is not None for a in pool.workers))
    try:
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            yield Epp(server, router, ext_proc_grpc.ExternalProcessorStub(channel))
    finally:
        await server.server.stop(0)
        await router.close()
        if stylers is not None:
            await stylers.close()


async def until(condition: Any, timeout_s: float = 30.0) -> None:
    """Wait for `condition()` to hold, checking every few milliseconds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def endpoint(worker: str) -> str:
    return f"{worker.rsplit(':', 1)[0]}:{ENDPOINT_PORT}"


def headers_message(path: str, end_of_stream: bool = False, **kwargs: Any) -> ext_proc_pb2.ProcessingRequest:
    pairs = {":method": "POST", ":path": path, ":authority": "tandem", "content-type": "application/json"}
    return ext_proc_pb2.ProcessingRequest(
        request_headers=ext_proc_pb2.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
            ),
            end_of_stream=end_of_stream,
        ),
        **kwargs,
    )


def body_messages(body: bytes, num_chunks: int = 2) -> list[ext_proc_pb2.ProcessingRequest]:
    size = -(-len(body) // num_chunks)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    return [
        ext_proc_pb2.ProcessingRequest(
            request_body=ext_proc_pb2.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1)
        )
        for i, chunk in enumerate(chunks)
    ]


async def exchange(
    stub: ext_proc_grpc.ExternalProcessorStub,
    body: bytes,
    path: str = "/v1/chat/completions",
    subset: list[str] | None = None,
) -> list[ext_proc_pb2.ProcessingResponse]:
    """One request as Envoy sends it in FULL_DUPLEX_STREAMED mode: headers and the body without
    waiting; then the answers up to the end of the body (or an immediate response)."""
    metadata = base_pb2.Metadata()
    if subset is not None:
        metadata.filter_metadata[SUBSET_NAMESPACE].update({SUBSET_KEY: subset})
    call = stub.Process()
    await call.write(headers_message(path, metadata_context=metadata))
    for message in body_messages(body):
        await call.write(message)
    answers: list[ext_proc_pb2.ProcessingResponse] = []
    while True:
        answer = await call.read()
        assert answer is not grpc.aio.EOF
        answers.append(answer)
        if answer.HasField("immediate_response"):
            break
        if (
            answer.HasField("request_body")
            and answer.request_body.response.body_mutation.streamed_response.end_of_stream
        ):
            break
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return answers


def picked(answers: list[ext_proc_pb2.ProcessingResponse], body: bytes) -> str:
    """The endpoint the answers name; checks they name it the way the EPP protocol says."""
    first = answers[0]
    assert first.WhichOneof("response") == "request_headers"
    mutation = first.request_headers.response.header_mutation
    [header] = mutation.set_headers
    assert header.header.key == DESTINATION_KEY
    assert header.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert first.request_headers.response.clear_route_cache
    value = header.header.raw_value.decode()
    assert MessageToDict(first.dynamic_metadata) == {DESTINATION_NAMESPACE: {DESTINATION_KEY: value}}
    echoed = b"".join(a.request_body.response.body_mutation.streamed_response.body for a in answers[1:])
    assert echoed == body  # the body goes on to the model server unchanged
    return value


async def warm(worker: str, token_ids: Sequence[int]) -> None:
    """Prefill `token_ids` on `worker` (tandem's proto), so its prefix cache holds them."""
    async with grpc.aio.insecure_channel(worker) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(
            request_id=str(uuid.uuid4()),
            prompt_token_ids=list(token_ids),
            sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0.0),
        )
        async for _ in stub.Generate(request):
            pass


async def rendered(styler: str, body: dict[str, Any]) -> tuple[int, ...]:
    client = StylerClient(styler)
    try:
        r = await client.render(body["messages"], None, True, False, None, None)
        return tuple(r.token_ids)
    finally:
        await client.close()


async def test_picks_the_worker_that_holds_the_prompt_prefix(epp: Epp, pool: Pool) -> None:
    token_ids = await rendered(pool.styler, CHAT)
    hashes = block_hashes(token_ids, 16, (len(token_ids) - 1) // 16)
    assert len(hashes) >= 2
    holder = pool.workers[1]  # with nothing known, the first pick would go to the first worker
    await warm(holder, token_ids)
    await until(lambda: epp.router.kv_index.cached_blocks(holder, hashes) == len(hashes))
    exact_before = epp.router.num_exact_routes
    body = json.dumps(CHAT).encode()
    assert picked(await exchange(epp.stub, body), body) == endpoint(holder)
    assert epp.router.num_exact_routes == exact_before + 1  # decided by the workers' KV events


async def test_falls_back_to_the_least_loaded_worker(epp: Epp, pool: Pool) -> None:
    busy = pool.workers[0]
    async with grpc.aio.insecure_channel(busy) as channel:
        request = worker_pb2.GenerateRequest(
            request_id=str(uuid.uuid4()),
            prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0),
        )
        stream = worker_pb2_grpc.WorkerStub(channel).Generate(request)
        await stream.read()  # running on the worker
        state = next(w for w in epp.router.workers if w.address == busy)
        await until(lambda: state.reported_load >= 1)
        # Token ids no worker has cached: no exact hit, no affinity, so load decides.
        body = json.dumps({"model": "stories260K", "prompt": list(range(300, 340)), "max_tokens": 2}).encode()
        assert picked(await exchange(epp.stub, body, path="/v1/completions"), body) == endpoint(
            pool.workers[1]
        )
        stream.cancel()


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"model": "stories260K", "messages": [', None),
        (json.dumps({"model": "stories260K"}).encode(), "messages"),
        (json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature"),
    ],
)
async def test_bad_body_gets_an_openai_400(epp: Epp, body: bytes, param: str | None) -> None:
    [answer] = await exchange(epp.stub, body)
    reply = answer.immediate_response
    assert reply.status.code == 400
    assert {h.header.key: h.header.raw_value.decode() for h in reply.headers.set_headers}["content-type"] == (
        "application/json"
    )
    error = json.loads(reply.body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


async def test_limits_are_left_to_the_members_gateways(epp: Epp) -> None:
    """More tools than a gateway allows by default (--max-tools 128) is for the member's gateway to
    judge (it may allow more): the picker still picks."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = json.dumps({**CHAT, "tools": [tool] * 130}).encode()
    assert picked(await exchange(epp.stub, body), body)


async def test_subset_hint_limits_the_choice(epp: Epp, pool: Pool) -> None:
    body = json.dumps(CHAT).encode()
    only = endpoint(pool.workers[0])
    assert picked(await exchange(epp.stub, body, subset=[only]), body) == only
    [answer] = await exchange(epp.stub, body, subset=["10.9.9.9:8000"])
    assert answer.immediate_response.status.code == 503
    assert json.loads(answer.immediate_response.body)["error"]["type"] == "service_unavailable_error"


async def test_buffered_mode_and_the_response_pass_through(epp: Epp) -> None:
    """BUFFERED (announced in protocol_config): the headers pass at once, the pick rides on the
    body answer; response headers and body pass through untouched."""
    body = json.dumps(CHAT).encode()
    mode = processing_mode_pb2.ProcessingMode
    call = epp.stub.Process()
    await call.write(
        headers_message(
            "/v1/chat/completions",
            protocol_config=ext_proc_pb2.ProtocolConfiguration(
                request_body_mode=mode.BUFFERED, response_body_mode=mode.BUFFERED
            ),
        )
    )
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.header_mutation.set_headers
    await call.write(
        ext_proc_pb2.ProcessingRequest(request_body=ext_proc_pb2.HttpBody(body=body, end_of_stream=True))
    )
    second = await call.read()
    [header] = second.request_body.response.header_mutation.set_headers
    assert header.header.key == DESTINATION_KEY
    value = header.header.raw_value.decode()
    assert MessageToDict(second.dynamic_metadata) == {DESTINATION_NAMESPACE: {DESTINATION_KEY: value}}
    await call.write(ext_proc_pb2.ProcessingRequest(response_headers=ext_proc_pb2.HttpHeaders()))
    assert (await call.read()).WhichOneof("response") == "response_headers"
    await call.write(
        ext_proc_pb2.ProcessingRequest(response_body=ext_proc_pb2.HttpBody(body=b"{}", end_of_stream=True))
    )
    last = await call.read()
    assert last.WhichOneof("response") == "response_body" and not last.response_body.response.HasField(
        "body_mutation"
    )
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def test_endpoint_is_the_workers_host_on_the_endpoint_port() -> None:
    addresses = ["10.0.0.7:50052", "openengine:10.0.0.8:50052", "smg:[fd00::9]:50052"]
    router = Router(addresses)
    try:
        picker = EndpointPicker(router, None, 8000)
        assert [picker.endpoint(w) for w in router.workers] == [
            "10.0.0.7:8000",
            "10.0.0.8:8000",
            "[fd00::9]:8000",
        ]
    finally:
        await router.close()


async def test_tandem_epp_command(pool: Pool) -> None:
    """`tandem epp` as its own process: health (readiness once workers are in rotation) and a pick."""
    address = f"127.0.0.1:{free_port()}"
    args = ["epp", "--address", address, "--styler", pool.styler, "--poll-interval", "0.2"]
    for worker in pool.workers:
        args += ["--worker", worker]
    proc = subprocess.Popen([sys.executable, "-m", "tandem", *args], env=_env(), cwd=REPO)
    try:
        await wait_for_serving(address, timeout_s=60, service="readiness")
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("liveness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            body = json.dumps(CHAT).encode()
            value = picked(await exchange(ext_proc_grpc.ExternalProcessorStub(channel), body), body)
            assert value in {endpoint(w) for w in pool.workers}
    finally:
        stop_processes([proc])
    assert proc.returncode == 0
