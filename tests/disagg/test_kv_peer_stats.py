"""A decode worker reports, per prefill worker and transport, what its KV fetches moved and at
what rate: `Info.kv_peer_transfers` and `/metrics` (peer and transport labels), between a real
prefill and decode worker over gRPC; a fetch from a dead peer counts as a failure of that peer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from test_kv_transfer import (
    COMMON,
    Pair,
    disaggregated,
    made_vocab,
    make_prompts,
    sampling_pb,
    wait_no_blocks,
)
from worker_servers import LoopThread, start_worker, stop_worker

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import SamplingParams
from tandem.v1 import worker_pb2


@pytest.fixture(scope="module")
def pair(loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    sock = tmp_path_factory.mktemp("sock")
    opts: dict[str, Any] = dict(model=str(stories_dir), **COMMON)
    made = Pair(
        start_worker(loop, sock, "peer-p", role="prefill", kv_chunk_bytes=4096, **opts),
        start_worker(loop, sock, "peer-d", role="decode", kv_transport="grpc", **opts),
        Engine(WorkerConfig(**opts)),
        made_vocab(stories_dir),
    )
    yield made
    stop_worker(loop, made.prefill)
    stop_worker(loop, made.decode)


def sample(name: str, peer: str, transport: str) -> float:
    value = REGISTRY.get_sample_value(name, {"peer": peer, "transport": transport})
    return 0.0 if value is None else value


def test_info_and_metrics_report_each_peers_transport_and_rate(pair: Pair) -> None:
    d = pair.stub(pair.decode)
    peer = pair.prefill.servicer.advertise_address
    assert not d.Info(worker_pb2.InfoRequest()).kv_peer_transfers  # nothing fetched yet
    _, prompts = make_prompts(pair.vocab_size)
    prompts = prompts[:5]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    expected = pair.reference.generate(prompts, sp, prefix="peer")
    for i, prompt in enumerate(prompts):
        tokens, _ = disaggregated(pair, f"peer-{i}", prompt, sp)
        assert tokens == expected[i].token_ids[0], i
    wait_no_blocks(pair.stub(pair.prefill), d)
    stats = pair.decode.servicer.fetch_stats[-len(prompts) :]
    assert all(s.ok and s.transport == "grpc" for s in stats), stats

    (entry,) = d.Info(worker_pb2.InfoRequest()).kv_peer_transfers
    assert entry.peer_address == peer
    assert entry.transport == worker_pb2.KV_TRANSPORT_GRPC
    assert (entry.num_transfers, entry.num_failed) == (len(prompts), 0)
    assert entry.bytes == sum(s.num_bytes for s in stats) > 0
    assert entry.seconds == pytest.approx(sum(s.seconds for s in stats))
    assert entry.gb_per_s == pytest.approx(entry.bytes / entry.seconds / 1e9)
    assert (entry.last_bytes, entry.last_seconds) == (stats[-1].num_bytes, pytest.approx(stats[-1].seconds))
    assert entry.last_gb_per_s == pytest.approx(stats[-1].num_bytes / stats[-1].seconds / 1e9)

    assert sample("tandem:kv_peer_fetch_bytes_total", peer, "grpc") == entry.bytes
    assert sample("tandem:kv_peer_fetch_seconds_total", peer, "grpc") == pytest.approx(entry.seconds)
    assert sample("tandem:kv_peer_fetch_gb_per_second", peer, "grpc") == pytest.approx(entry.last_gb_per_s)
    assert sample("tandem:kv_peer_fetch_failures_total", peer, "grpc") == 0


def test_a_dead_peer_counts_as_a_failed_fetch_of_that_peer(pair: Pair) -> None:
    d = pair.stub(pair.decode)
    dead = "unix:/nonexistent/dead-peer.sock"
    prompt = make_prompts(pair.vocab_size)[1][4]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    expected = pair.reference.generate([prompt], sp, prefix="dead")[0].token_ids[0]
    request = worker_pb2.GenerateRequest(
        request_id="dead-peer",
        prompt_token_ids=prompt,
        sampling=sampling_pb(sp),
        generated_token_ids=expected[:1],
        kv_source=worker_pb2.KVHandle(
            handle_id="x", address=dead, num_tokens=len(prompt), fingerprint=pair.decode.servicer.fingerprint
        ),
    )
    tokens = list(expected[:1])
    for chunk in d.Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
    assert tokens == expected  # recomputed locally
    entries = {e.peer_address: e for e in d.Info(worker_pb2.InfoRequest()).kv_peer_transfers}
    failed = entries[dead]
    assert (failed.num_transfers, failed.num_failed, failed.bytes, failed.gb_per_s) == (0, 1, 0, 0.0)
    assert sample("tandem:kv_peer_fetch_failures_total", dead, "grpc") == 1
    wait_no_blocks(d)
