"""`POST /v1/embeddings` through the real stack (styler + `--task embed` worker + gateway
processes), driven by the official `openai` SDK: a tiny random Qwen3 saved as the base model (as
Qwen3-Embedding is) with the real Qwen3 tokenizer. Embeddings equal transformers' (AutoModel's
last hidden state at the last token, normalised) within 1e-4, as floats and as base64, for texts
and token ids, with `dimensions`, with several requests in flight; every answer is validated
against OpenAI's published schema; bad requests are 400s naming the field; a chat request to the
embed stack and an embeddings request to a generate stack are 400s saying why; no KV block stays
in use; the gRPC Inference API's Embed says the same.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import openai_spec as spec
import pytest
import torch
from gateway_stack import Stack

from tandem.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.e2e]

HIDDEN_SIZE = 32
MAX_MODEL_LEN = 64
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "Embeddings map text to vectors; similar texts land near each other in that space, "
    "which is what retrieval uses.",
]


def write_tiny_qwen3_embedding(shared_dir: Path, path: Path) -> Path:
    from transformers import AutoModel, AutoTokenizer, Qwen3Config

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / "qwen3" / name, path / name)
    vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=151643,
    )
    model = AutoModel.from_config(config)
    with torch.no_grad():  # a final norm that is not all ones, so it visibly takes part
        model.norm.weight.copy_(torch.rand(HIDDEN_SIZE) + 0.5)
    model.save_pretrained(str(path))
    return path


class Reference:
    """transformers on the same directory: the tokenizer, and AutoModel's pooled embeddings."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def embed(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            hidden = self.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(hidden, dim=-1).numpy()


@pytest.fixture(scope="module")
def model_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3_embedding(shared_dir, tmp_path_factory.mktemp("tiny-qwen3-embedding"))


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("embed-stack"),
        model_dir,
        worker_args=[
            "--task",
            "embed",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-num-batched-tokens",
            "32",
        ],
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


def _post(stack: Stack, body: dict[str, Any], path: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(stack.url + path, json=body, timeout=60)


def _close(got: Any, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-4, rtol=0)


def _blocks_used(stack: Stack) -> int:
    async def used() -> int:
        async with grpc.aio.insecure_channel(stack.worker_addresses[0]) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
            return int(load.num_kv_blocks_used)

    return asyncio.run(used())


def test_floats_equal_transformers(stack: Stack, ref: Reference) -> None:
    reply = _post(stack, {"model": stack.model.name, "input": TEXTS, "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    spec.check("CreateEmbeddingResponse", body)
    assert body["model"] == stack.model.name and [d["index"] for d in body["data"]] == [0, 1, 2]
    num_tokens = sum(len(ref.ids(t)) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    for text, item in zip(TEXTS, body["data"], strict=True):
        assert len(item["embedding"]) == HIDDEN_SIZE
        _close(item["embedding"], ref.embed(ref.ids(text)))

    sdk = _client(stack).embeddings.create(model=stack.model.name, input=TEXTS, encoding_format="float")
    for item, want in zip(sdk.data, body["data"], strict=True):  # (a prefix-cache hit this time)
        np.testing.assert_allclose(item.embedding, want["embedding"], atol=1e-6, rtol=0)
    assert sdk.usage.prompt_tokens == num_tokens


def test_base64(stack: Stack) -> None:
    floats = _post(stack, {"input": TEXTS[0]}).json()["data"][0]["embedding"]
    body = _post(stack, {"input": TEXTS[0], "encoding_format": "base64"}).json()
    encoded = body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, atol=1e-6, rtol=0)
    spec.check("CreateEmbeddingResponse", {**body, "data": [{**body["data"][0], "embedding": floats}]})
    # The SDK asks for base64 when no encoding_format is given, and decodes it itself.
    sdk = _client(stack).embeddings.create(model=stack.model.name, input=TEXTS[0])
    np.testing.assert_allclose(sdk.data[0].embedding, decoded, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dimensions", [1, 8, HIDDEN_SIZE])
def test_dimensions_truncate_and_renormalise(stack: Stack, ref: Reference, dimensions: int) -> None:
    sdk = _client(stack).embeddings.create(
        model=stack.model.name, input=TEXTS[2], dimensions=dimensions, encoding_format="float"
    )
    full = ref.embed(ref.ids(TEXTS[2]))
    want = full[:dimensions] / np.linalg.norm(full[:dimensions])
    assert len(sdk.data[0].embedding) == dimensions
    _close(sdk.data[0].embedding, want)


def test_token_id_inputs(stack: Stack, ref: Reference) -> None:
    client = _client(stack)
    ids = [ref.ids(t) for t in TEXTS]
    one = client.embeddings.create(model=stack.model.name, input=ids[0], encoding_format="float")
    _close(one.data[0].embedding, ref.embed(ids[0]))
    many = client.embeddings.create(model=stack.model.name, input=ids, encoding_format="float")
    assert many.usage.prompt_tokens == sum(map(len, ids))
    for item, prompt in zip(many.data, ids, strict=True):
        _close(item.embedding, ref.embed(prompt))
    # the whole context: nothing is generated after an input
    full = [(7 * i) % 5000 + 100 for i in range(MAX_MODEL_LEN)]
    whole = client.embeddings.create(model=stack.model.name, input=[full], encoding_format="float")
    _close(whole.data[0].embedding, ref.embed(full))


def test_requests_in_flight_together(stack: Stack, ref: Reference) -> None:
    """Mixed lengths from several clients at once: the worker batches and chunks them (a step
    takes 32 tokens), and each answer is its own input's."""
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    inputs = [" ".join(words[: 1 + (5 * i) % len(words)]) * (1 + i % 3) for i in range(8)]

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        async with client:
            return list(
                await asyncio.gather(
                    *(
                        client.embeddings.create(
                            model=stack.model.name, input=[text, text[::-1]], encoding_format="float"
                        )
                        for text in inputs
                    )
                )
            )

    for text, reply in zip(inputs, asyncio.run(run()), strict=True):
        _close(reply.data[0].embedding, ref.embed(ref.ids(text)))
        _close(reply.data[1].embedding, ref.embed(ref.ids(text[::-1])))
    assert _blocks_used(stack) == 0


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": ""}, "input", "must not be empty"),
        ({"input": []}, "input", "must be a string, a list of strings"),
        ({"input": [[]]}, "input", "must be a string, a list of strings"),
        ({"input": [[1, 2], "x"]}, "input", "must be a string, a list of strings"),
        ({"input": ["a", ""]}, "input", "must not be empty"),
        ({"input": ["a"] * 257}, "input", "at most 256 are allowed"),
        ({"input": [5] * (MAX_MODEL_LEN + 1)}, "input", "maximum context length is 64 tokens"),
        ({"input": "word " * 100}, "input", "maximum context length is 64 tokens"),
        ({"input": [[5], [10**6]]}, "input", "below the vocabulary size"),
        ({"input": "x", "dimensions": 0}, "dimensions", "must be >= 1"),
        ({"input": "x", "dimensions": HIDDEN_SIZE + 1}, "dimensions", "32-dimensional embeddings"),
        ({"input": "x", "dimensions": "8"}, "dimensions", "must be an integer"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "must be one of float, base64"),
        ({"input": "x", "user": 5}, "user", "must be a string"),
        ({"input": "x", "truncate": True}, "truncate", "unknown or unsupported field"),
        ({}, "input", "'input' is required"),
    ],
)
def test_bad_requests(stack: Stack, body: dict[str, Any], param: str, message: str) -> None:
    reply = _post(stack, body)
    assert reply.status_code == 400, reply.text
    spec.check("ErrorResponse", reply.json())
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_errors_through_the_sdk(stack: Stack) -> None:
    client = _client(stack)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=stack.model.name, input="x", dimensions=HIDDEN_SIZE * 2)
    assert err.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    # text generation on an embed stack: a 400 naming why, not a 503
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=stack.model.name, messages=[{"role": "user", "content": "hi"}])
    assert "--task embed" in err.value.message and err.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=stack.model.name, prompt="hi", max_tokens=2)
    assert _blocks_used(stack) == 0


def test_generate_stack_refuses_embeddings(stories_stack: Stack) -> None:
    reply = _post(stories_stack, {"input": "Once upon a time"})
    assert reply.status_code == 400, reply.text
    spec.check("ErrorResponse", reply.json())
    error = reply.json()["error"]
    assert error["param"] == "model" and "--task embed" in error["message"]


def test_grpc_embed(stack: Stack, ref: Reference) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Embed(
            inference_pb2.EmbedTextRequest(inputs=[inference_pb2.EmbedTextInput(text=t) for t in TEXTS]),
            timeout=60,
        )
        assert reply.model == stack.model.name and reply.usage.prompt_tokens == sum(
            len(ref.ids(t)) for t in TEXTS
        )
        for text, item in zip(TEXTS, reply.data, strict=True):
            _close(list(item.values), ref.embed(ref.ids(text)))
        ids = inference_pb2.TokenIds(ids=ref.ids(TEXTS[0]))
        short = stub.Embed(
            inference_pb2.EmbedTextRequest(
                inputs=[inference_pb2.EmbedTextInput(token_ids=ids)], dimensions=4
            ),
            timeout=60,
        )
        full = ref.embed(ref.ids(TEXTS[0]))
        _close(list(short.data[0].values), full[:4] / np.linalg.norm(full[:4]))
        for request in (
            inference_pb2.EmbedTextRequest(
                inputs=[inference_pb2.EmbedTextInput(text="a"), inference_pb2.EmbedTextInput(token_ids=ids)]
            ),
            inference_pb2.EmbedTextRequest(inputs=[inference_pb2.EmbedTextInput(text="a")], dimensions=999),
            inference_pb2.EmbedTextRequest(),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Embed(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_openapi_document_agrees(stack: Stack) -> None:
    """The gateway's /openapi.json describes the route: what it accepts is served, what it refuses
    (that a schema can express) is a 400."""
    import jsonschema

    document = httpx.get(stack.url + "/openapi.json", timeout=30).json()
    assert "/v1/embeddings" in document["paths"]
    validator = jsonschema.Draft202012Validator({**document, "$ref": "#/components/schemas/EmbeddingRequest"})
    good = [
        {"input": "a", "model": stack.model.name, "dimensions": 4, "encoding_format": "base64", "user": "u"},
        {"input": ["a", "b"]},
        {"input": [5, 6]},
        {"input": [[5], [6, 7]], "encoding_format": "float"},
    ]
    for body in good:
        assert validator.is_valid(body), body
        assert _post(stack, body).status_code == 200, body
    bad = [
        {"input": ""},
        {"input": []},
        {"input": [[]]},
        {"input": ["a"] * 257},
        {"input": "a", "dimensions": 0},
    ]
    bad += [{"input": "a", "encoding_format": "int8"}, {"input": "a", "extra": 1}, {}]
    for body in bad:
        assert not validator.is_valid(body), body
        assert _post(stack, body).status_code == 400, body
