"""OpenEngine's disaggregation hand-off on tandem workers: a prefill worker's Generate ends with
PrefillReady (a KvSessionRef naming tandem's KV handle), a decode worker given that session in
`kv.session` pulls the KV (FetchKV) and continues, and the tokens equal one worker's greedy run.
Abort by `kv_session` frees the KV a prefill holds.

Starts its own prefill and decode workers (stories260K): needs tandem workers of its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from openengine.v1 import generation_pb2, kv_pb2, lifecycle_pb2, openengine_pb2_grpc, server_pb2
from services.common.server import wait_for_serving
from tests.e2e.stack import stop_processes
from tests.protocols.conftest import REPO, worker_args

PROMPT = [1, 403, 407, 261, 378, 300, 310, 320, 330, 340, 350, 360, 370, 380, 390, 400, 410, 420]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def workers(
    request: pytest.FixtureRequest, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, grpc.Channel]]:
    """Channels to a prefill and a decode worker."""
    if request.config.getoption("--target") is not None:
        pytest.skip("the hand-off is between tandem workers of its own")
    run_dir = tmp_path_factory.mktemp("oe-disagg")
    addresses = {role: f"unix:{run_dir}/{role}.sock" for role in ("prefill", "decode")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandem.cli",
                "worker",
                *worker_args(stories_dir, address),
                "--role",
                role,
            ],
            cwd=REPO,
            env=env,
        )
        for role, address in addresses.items()
    ]
    try:

        async def wait() -> None:
            await asyncio.gather(*(wait_for_serving(a, timeout_s=60) for a in addresses.values()))

        asyncio.run(wait())
        channels = {role: grpc.insecure_channel(address) for role, address in addresses.items()}
        yield channels
        for channel in channels.values():
            channel.close()
    finally:
        stop_processes(procs)


def generate(channel: grpc.Channel, rid: str, **fields: object) -> list[generation_pb2.GenerateResponse]:
    request = generation_pb2.GenerateRequest(
        request_id=rid,
        token_ids=generation_pb2.TokenIds(ids=PROMPT),
        sampling=generation_pb2.SamplingParams(temperature=0.0),
        stopping=generation_pb2.StoppingOptions(max_tokens=MAX_TOKENS, ignore_eos=True),
        **fields,  # type: ignore[arg-type]
    )
    return list(openengine_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))


def tokens(events: list[generation_pb2.GenerateResponse]) -> list[int]:
    return [t.token_id for e in events if e.WhichOneof("event") == "token" for t in e.token.tokens]


def active_sessions(channel: grpc.Channel) -> int:
    return int(
        openengine_pb2_grpc.ControlStub(channel).GetLoad(server_pb2.GetLoadRequest()).active_kv_sessions
    )


def test_prefill_then_decode_equals_one_workers_tokens(workers: dict[str, grpc.Channel]) -> None:
    prefilled = generate(workers["prefill"], "oe-pd-prefill")
    kinds = [e.WhichOneof("event") for e in prefilled]
    assert kinds == ["token", "prefill_ready"]  # PrefillReady is the terminal success event
    ready = prefilled[-1]
    assert ready.usage.prompt_tokens == len(PROMPT)
    session = ready.prefill_ready.kv_session
    assert session.session_id and session.transfer_backend == "tandem-fetchkv"
    assert [e.protocol for e in session.endpoints] == ["grpc"]
    assert active_sessions(workers["prefill"]) == 1  # the KV is held for the decode

    decoded = generate(workers["decode"], "oe-pd-decode", kv=generation_pb2.KvOptions(session=session))
    assert [e.WhichOneof("event") for e in decoded][-1] == "finished"
    assert decoded[-1].finished.reason == generation_pb2.FINISH_REASON_LENGTH
    whole = tokens(prefilled) + tokens(decoded)
    assert len(whole) == MAX_TOKENS
    assert active_sessions(workers["prefill"]) == 0  # fetched, so freed

    assert whole == tokens(generate(workers["decode"], "oe-pd-whole"))  # greedy, one worker


def test_prefill_worker_declares_its_connector(workers: dict[str, grpc.Channel]) -> None:
    for role, channel in workers.items():
        info = openengine_pb2_grpc.ControlStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
        assert (
            info.engine_role
            == {"prefill": server_pb2.ENGINE_ROLE_PREFILL, "decode": server_pb2.ENGINE_ROLE_DECODE}[role]
        )
        assert info.kv_connector.enabled and info.kv_connector.transfer_backend == "tandem-fetchkv"
        assert info.kv_connector.supports_decode_pull


def test_abort_by_kv_session_frees_the_prefilled_kv(workers: dict[str, grpc.Channel]) -> None:
    session = generate(workers["prefill"], "oe-pd-abandoned")[-1].prefill_ready.kv_session
    assert active_sessions(workers["prefill"]) == 1
    control = openengine_pb2_grpc.ControlStub(workers["prefill"])
    reply = control.Abort(lifecycle_pb2.AbortRequest(kv_session=session))
    assert reply.status == lifecycle_pb2.ABORT_STATUS_ABORTED
    assert active_sessions(workers["prefill"]) == 0
    again = control.Abort(lifecycle_pb2.AbortRequest(kv_session=session))
    assert again.status == lifecycle_pb2.ABORT_STATUS_ALREADY_FINISHED


@pytest.mark.parametrize(
    ("role", "session", "code", "field"),
    [
        (
            "prefill",
            kv_pb2.KvSessionRef(session_id="x", transfer_backend="tandem-fetchkv"),
            "FAILED_PRECONDITION",
            "kv.session",
        ),
        (
            "decode",
            kv_pb2.KvSessionRef(session_id="x", transfer_backend="nixl"),
            "UNIMPLEMENTED",
            "kv.session.transfer_backend",
        ),
        (
            "decode",
            kv_pb2.KvSessionRef(session_id="x", transfer_backend="tandem-fetchkv"),
            "INVALID_ARGUMENT",
            "kv.session.endpoints",
        ),
        (
            "decode",
            kv_pb2.KvSessionRef(
                session_id="x",
                transfer_backend="tandem-fetchkv",
                endpoints=[kv_pb2.KvEndpoint(host="h", port=1)],
            ),
            "INVALID_ARGUMENT",
            "kv.session.attributes_struct",
        ),
        (
            "decode",
            kv_pb2.KvSessionRef(session_id="x", transfer_backend="tandem-fetchkv", dp_rank=2),
            "INVALID_ARGUMENT",
            "kv.session.dp_rank",
        ),
    ],
)
def test_bad_sessions_are_refused_naming_the_field(
    workers: dict[str, grpc.Channel], role: str, session: kv_pb2.KvSessionRef, code: str, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(workers[role], f"oe-pd-bad-{field}", kv=generation_pb2.KvOptions(session=session))
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert (err.value.details() or "").startswith(f"{field}: ")
