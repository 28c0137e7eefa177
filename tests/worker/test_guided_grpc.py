"""Guided decoding through real worker gRPC servers (in-process, unix sockets): Generate streams
outputs inside the constraint, bad constraints are INVALID_ARGUMENT naming the field (the worker
keeps serving), a worker without a tokenizer says FAILED_PRECONDITION, resume and the
disaggregated prefill -> decode path keep the constraint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from guided_testlib import CHECKS, CHOICES, REGEX, SCHEMA, decode, load_tokenizer, save_tiny_llama
from prometheus_client import REGISTRY
from tokenizers import Tokenizer

from services.common.metrics import GUIDED_REQUESTS
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.disagg.worker_servers import LoopThread, start_worker, stop_worker

COMMON: dict[str, Any] = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)


@dataclass
class Workers:
    unified: worker_pb2_grpc.WorkerStub
    bare: worker_pb2_grpc.WorkerStub  # no tokenizer
    prefill: worker_pb2_grpc.WorkerStub
    decode: worker_pb2_grpc.WorkerStub


@pytest.fixture(scope="module")
def workers(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    loop = LoopThread()
    sock = tmp_path_factory.mktemp("sock")
    bare_model = save_tiny_llama(tmp_path_factory.mktemp("bare"), uniform=False)
    servers = [
        start_worker(loop, sock, "unified", model=str(stories_dir), **COMMON),
        start_worker(loop, sock, "bare", model=str(bare_model), **COMMON),
        start_worker(loop, sock, "prefill", model=str(stories_dir), role="prefill", **COMMON),
        start_worker(loop, sock, "decode", model=str(stories_dir), role="decode", **COMMON),
    ]
    channels = [grpc.insecure_channel(s.address) for s in servers]
    stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
    yield Workers(*stubs)
    for channel in channels:
        channel.close()
    for server in servers:
        stop_worker(loop, server)
    loop.close()


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return list(tokenizer.encode("Once upon a time, there was a girl named").ids)


def guided_pb(kind: str, value: Any) -> common_pb2.GuidedDecoding:
    if kind == "choice":
        return common_pb2.GuidedDecoding(choice=common_pb2.StringList(values=value))
    return common_pb2.GuidedDecoding(**{kind: value})


def sampling(guided: common_pb2.GuidedDecoding | None = None, **fields: Any) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(**fields)
    if guided is not None:
        msg.guided.CopyFrom(guided)
    return msg


@dataclass
class Streamed:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[common_pb2.TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, int] = field(default_factory=dict)
    usage: common_pb2.Usage | None = None


def generate(stub: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int], **request: Any) -> Streamed:
    out = Streamed()
    call = stub.Generate(
        worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, **request), timeout=60
    )
    for chunk in call:
        for choice in chunk.choices:
            out.tokens.setdefault(choice.index, []).extend(choice.token_ids)
            out.logprobs.setdefault(choice.index, []).extend(choice.logprobs)
            if choice.finish_reason:
                out.finish[choice.index] = choice.finish_reason
        if chunk.HasField("usage"):
            out.usage = chunk.usage
    return out


def expect_error(code: grpc.StatusCode, fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def test_generate_streams_constrained_choices(
    workers: Workers, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    before = REGISTRY.get_sample_value(GUIDED_REQUESTS, {"kind": "regex"}) or 0.0
    out = generate(
        workers.unified,
        "regex",
        prompt,
        sampling=sampling(guided_pb("regex", REGEX), temperature=1.0, seed=5, n=2, logprobs=1),
    )
    assert out.finish == {0: common_pb2.FINISH_REASON_STOP, 1: common_pb2.FINISH_REASON_STOP}
    for index in (0, 1):
        CHECKS["regex"](decode(tokenizer, out.tokens[index]))
        assert [lp.token_id for lp in out.logprobs[index]] == out.tokens[index]
    assert out.usage is not None and out.usage.completion_tokens == len(out.tokens[0]) + len(out.tokens[1])
    assert REGISTRY.get_sample_value(GUIDED_REQUESTS, {"kind": "regex"}) == before + 1

    out = generate(
        workers.unified,
        "schema",
        prompt,
        sampling=sampling(guided_pb("json_schema", json.dumps(SCHEMA)), seed=1),
    )
    assert out.finish == {0: common_pb2.FINISH_REASON_STOP}
    CHECKS["json_schema"](decode(tokenizer, out.tokens[0]))
    out = generate(workers.unified, "choice", prompt, sampling=sampling(guided_pb("choice", CHOICES), seed=2))
    assert decode(tokenizer, out.tokens[0]) in CHOICES


@pytest.mark.parametrize(
    ("guided", "field_name", "snippet"),
    [
        (guided_pb("regex", "[a-"), "sampling.guided.regex", "regex"),
        (guided_pb("json_schema", '{"type": "nope"}'), "sampling.guided.json_schema", "nope"),
        (guided_pb("json_schema", "{"), "sampling.guided.json_schema", "not valid JSON"),
        (guided_pb("lark_grammar", "start: nowhere"), "sampling.guided.lark_grammar", "nowhere"),
        (guided_pb("choice", []), "sampling.guided.choice", "at least one"),
        (guided_pb("json_object", False), "sampling.guided.json_object", "true"),
        (common_pb2.GuidedDecoding(), "sampling.guided", "json_schema"),
    ],
)
def test_bad_constraints_are_invalid_argument(
    workers: Workers, prompt: list[int], guided: common_pb2.GuidedDecoding, field_name: str, snippet: str
) -> None:
    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        generate,
        workers.unified,
        "bad",
        prompt,
        sampling=sampling(guided, max_tokens=10),
    )
    assert details.startswith(field_name + ": ") and snippet in details, details
    # ... on Prefill as well, and the worker keeps serving
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        workers.prefill.Prefill,
        worker_pb2.PrefillRequest(request_id="bad-p", prompt_token_ids=prompt, sampling=sampling(guided)),
        timeout=30,
    )
    ok = generate(workers.unified, "after", prompt, sampling=sampling(temperature=0.0, max_tokens=5))
    assert len(ok.tokens[0]) == 5


def test_a_worker_without_tokenizer_refuses_only_guided_requests(workers: Workers) -> None:
    details = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        generate,
        workers.bare,
        "guided",
        [1, 5, 6],
        sampling=sampling(guided_pb("regex", "a+")),
    )
    assert "tokenizer" in details
    out = generate(workers.bare, "free", [1, 5, 6], sampling=sampling(temperature=0.0, max_tokens=4))
    assert len(out.tokens[0]) == 4


def test_resume_over_grpc(workers: Workers, tokenizer: Tokenizer, prompt: list[int]) -> None:
    sp = sampling(guided_pb("json_schema", json.dumps(SCHEMA)), temperature=1.0, seed=9)
    full = generate(workers.unified, "full", prompt, sampling=sp).tokens[0]
    cut = len(full) // 2
    rest = generate(workers.unified, "rest", prompt, sampling=sp, generated_token_ids=full[:cut])
    assert full[:cut] + rest.tokens[0] == full
    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        generate,
        workers.unified,
        "off-grammar",
        prompt,
        sampling=sp,
        generated_token_ids=tokenizer.encode("Lily", add_special_tokens=False).ids,
    )
    assert details.startswith("generated_token_ids: ")


def test_disaggregated_prefill_and_decode_keep_the_constraint(
    workers: Workers, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    for seed in range(3):
        sp = sampling(guided_pb("json_schema", json.dumps(SCHEMA)), temperature=1.0, seed=seed)
        unified = generate(workers.unified, f"u{seed}", prompt, sampling=sp).tokens[0]
        reply = workers.prefill.Prefill(
            worker_pb2.PrefillRequest(request_id=f"p{seed}", prompt_token_ids=prompt, sampling=sp), timeout=60
        )
        first = list(reply.first.token_ids)
        assert len(first) == 1 and reply.HasField("handle")
        out = generate(
            workers.decode, f"d{seed}", prompt, sampling=sp, generated_token_ids=first, kv_source=reply.handle
        )
        assert first + out.tokens[0] == unified
        assert out.finish == {0: common_pb2.FINISH_REASON_STOP}
        CHECKS["json_schema"](decode(tokenizer, first + out.tokens[0]))
    # a constraint completed by the first token finishes on the prefill worker: no handle
    reply = workers.prefill.Prefill(
        worker_pb2.PrefillRequest(
            request_id="one-token", prompt_token_ids=prompt, sampling=sampling(guided_pb("regex", "[0-9]"))
        ),
        timeout=60,
    )
    assert reply.first.finish_reason == common_pb2.FINISH_REASON_STOP and not reply.HasField("handle")
    assert decode(tokenizer, list(reply.first.token_ids)).isdigit()
