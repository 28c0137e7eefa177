"""LoRA through the real stack (styler, two workers, gateway) with the official openai client:
`model="<adapter>"` selects an adapter, /v1/models lists each with its parent, vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key) fan out to both workers,
and an adapter that is not loaded is OpenAI's 404 model_not_found."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from lora_testlib import Adapter, expected_text, make_adapter
from worker_testlib import RefModel, load_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
from gateway_stack import Stack

from tandem.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

KEY = "sk-lora-test"
PROMPT = [1, 403, 407, 365, 261, 422]  # token ids: the comparison needs no tokenizer round trip


@pytest.fixture(scope="module")
def setup(
    stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, RefModel, Adapter, Adapter]]:
    base = load_ref(stories_dir)
    first = make_adapter(base, tmp_path_factory.mktemp("story-a"), "story-a", seed=21, rank=8, scale=1.0)
    second = make_adapter(base, tmp_path_factory.mktemp("story-b"), "story-b", seed=22, rank=4, scale=1.0)
    args = ["--lora-modules", f"story-a={first.path}", "--max-loras", "2", "--max-lora-rank", "8"]
    stack = Stack(
        tmp_path_factory.mktemp("lora-stack"),
        stories_dir,
        num_workers=2,
        gateway_args=["--api-key", KEY],
        worker_args=args,
    )
    try:
        yield stack.start(), base, first, second
    finally:
        stack.stop()


def _post(stack: Stack, path: str, body: dict[str, Any], key: str | None = KEY) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(stack.url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.model == model
    return out.choices[0].text


def _expected(client: openai.OpenAI, ref: RefModel) -> str:
    return expected_text(client, ref, PROMPT, 12)


def _worker_loras(stack: Stack) -> list[list[str]]:
    names = []
    for address in stack.worker_addresses:
        with grpc.insecure_channel(address) as channel:
            reply = worker_pb2_grpc.WorkerStub(channel).ListLoRAs(worker_pb2.ListLoRAsRequest())
            names.append(sorted(a.lora_name for a in reply.adapters))
    return names


def test_adapters_through_the_stack(setup: tuple[Stack, RefModel, Adapter, Adapter]) -> None:
    stack, base, first, second = setup
    client = openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0)
    base_name = client.models.list().data[0].id
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {base_name, "story-a"}
    assert cards["story-a"].model_extra["parent"] == base_name  # type: ignore[index]
    assert cards[base_name].model_extra["parent"] is None  # type: ignore[index]
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:  # the public gRPC API too
        reply = inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {KEY}")]
        )
    assert [(m.id, m.parent) for m in reply.models] == [(base_name, ""), ("story-a", base_name)]

    base_text, first_text = _complete(client, base_name), _complete(client, "story-a")
    assert first_text == _expected(client, first.ref) != base_text
    assert base_text == _expected(client, base)

    # the load and unload routes need the key
    assert (
        _post(
            stack, "/v1/load_lora_adapter", {"lora_name": "story-b", "lora_path": str(second.path)}, key=None
        )[0]
        == 401
    )
    status, text = _post(
        stack, "/v1/load_lora_adapter", {"lora_name": "story-b", "lora_path": str(second.path)}
    )
    assert (status, text) == (200, "Success: LoRA adapter 'story-b' added successfully.")
    assert _worker_loras(stack) == [["story-a", "story-b"]] * 2  # on every worker
    assert {m.id for m in client.models.list().data} == {base_name, "story-a", "story-b"}
    for _ in range(3):  # both adapters and the base, requests spread over both workers
        assert _complete(client, "story-b") == _expected(client, second.ref)
        assert _complete(client, "story-a") == first_text
        assert _complete(client, base_name) == base_text

    # bad loads: 400 naming the field, nothing loaded anywhere
    status, text = _post(
        stack, "/v1/load_lora_adapter", {"lora_name": "nope", "lora_path": "/does/not/exist"}
    )
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "lora_path" and "is not a directory" in error["message"]
    status, text = _post(
        stack, "/v1/load_lora_adapter", {"lora_name": "story-b", "lora_path": str(second.path)}
    )
    assert status == 400 and json.loads(text)["error"]["param"] == "lora_name"
    status, text = _post(stack, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and json.loads(text)["error"]["param"] == "lora_path"
    assert _worker_loras(stack) == [["story-a", "story-b"]] * 2

    status, text = _post(stack, "/v1/unload_lora_adapter", {"lora_name": "story-b"})
    assert (status, text) == (200, "Success: LoRA adapter 'story-b' removed successfully.")
    assert _worker_loras(stack) == [["story-a"]] * 2
    with pytest.raises(openai.NotFoundError) as err:
        _complete(client, "story-b")
    assert err.value.code == "model_not_found"
    status, text = _post(stack, "/v1/unload_lora_adapter", {"lora_name": "story-b"})
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("story-b")
    assert client.models.retrieve("story-a").id == "story-a"
