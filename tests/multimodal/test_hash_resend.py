"""Images sent as their content hash alone when the worker already holds them.

Below the gateway (a tiny LLaVA engine in process): a hash-only image gives the tokens its pixels
give; it resolves at admission, so an eviction before the forward cannot take it away, and an
image admitted with pixels but not encoded yet serves it too; an unknown hash is refused naming
`images[i].hash`; an encode worker's rows can be named by their hash later, and the encode worker
itself takes pixels only.

Through the real stack (styler, CPU worker, gateway; the worker's encoder cache holds 2 images and
prefix caching is off, so every answer is computed from the image's embeddings): a second turn
with the same image sends no pixels (the worker's Info counters) and answers as the first did; an
image the worker evicted behind the gateway's back is resent with its pixels, transparently; an
unknown hash straight over gRPC is FAILED_PRECONDITION naming the field and costs a concurrent
request nothing. (Qwen2.5-VL and the encode role through `tandem up`: test_qwen2_5_vl_up.py.)
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
from gateway_stack import Stack
from llava_testlib import IMAGE_TOKEN, TOKENS_PER_IMAGE, chat, image_part, png

from gateway.sent_images import SentImages
from services.styler.images import ClipPreprocessor, decode_image
from services.worker.config import WorkerConfig
from services.worker.encoder import VisionEncoder
from services.worker.engine import Engine, GenerateResult, collect
from services.worker.errors import ImageNotCachedError, InvalidRequestError
from services.worker.mm_inputs import ImageInput, image_to_pb, images_from_pb
from services.worker.request import EngineRequest, SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _prompt(lead: list[int], tail: list[int]) -> list[int]:
    return [1, *lead, *[IMAGE_TOKEN] * TOKENS_PER_IMAGE, *tail]


PROMPT = _prompt([40, 41, 42], [50, 51, 52, 53])
OTHER_PROMPT = _prompt([60, 61, 62, 63, 64, 65], [70, 71])  # the image at another offset


def _image(llava_dir: Path, seed: int, prompt: list[int] = PROMPT) -> ImageInput:
    pv = ClipPreprocessor.from_model_dir(str(llava_dir))(decode_image(png(48 + seed, 40, seed=seed)))
    return ImageInput(pv.hash, prompt.index(IMAGE_TOKEN), TOKENS_PER_IMAGE, torch.from_numpy(pv.array))


def _by_hash(image: ImageInput, prompt: list[int] = PROMPT) -> ImageInput:
    """`image` as its hash alone, through the wire form (common_pb2.ImageInput)."""
    wire = image_to_pb(replace(image, offset=prompt.index(IMAGE_TOKEN), by_hash=True))
    assert not wire.pixel_values and not wire.embeddings
    (out,) = images_from_pb([wire])
    assert out.by_hash
    return out


def _engine(llava_dir: Path, encoder_cache_size: int = 64) -> Engine:
    return Engine(
        WorkerConfig(
            model=str(llava_dir),
            device="cpu",
            kv_cache_memory="4MiB",
            enable_prefix_caching=False,  # every answer computed from the image's embeddings
            encoder_cache_size=encoder_cache_size,
        )
    )


def _run(engine: Engine, rid: str, image: ImageInput, prompt: list[int] = PROMPT) -> list[int]:
    (result,) = engine.run([EngineRequest(rid, tuple(prompt), GREEDY, images=(image,))])
    assert result.error is None
    return result.token_ids[0]


def test_hash_only_gives_the_pixels_tokens(llava_dir: Path) -> None:
    engine = _engine(llava_dir)
    cache = engine.runner.encoder_cache
    image = _image(llava_dir, seed=1)
    first = _run(engine, "a", image)
    assert (cache.misses, cache.by_hash, cache.bytes_received) == (1, 0, image.pixel_values.numel() * 4)
    assert _run(engine, "b", _by_hash(image)) == first
    # the same image at another place of another prompt, by hash, then with its pixels
    other = _run(engine, "c", _by_hash(image, OTHER_PROMPT), OTHER_PROMPT)
    assert _run(engine, "d", replace(image, offset=OTHER_PROMPT.index(IMAGE_TOKEN)), OTHER_PROMPT) == other
    assert (cache.misses, cache.hits, cache.by_hash) == (1, 3, 2)  # encoded once
    assert cache.bytes_received == 2 * image.pixel_values.numel() * 4  # the pixel requests' alone


def test_eviction_after_admission_costs_nothing(llava_dir: Path) -> None:
    """A hash-only image resolves when its request is admitted: evicting it before the forward
    (here by hand, as any other image's encoding would) changes nothing for that request."""
    engine = _engine(llava_dir, encoder_cache_size=1)
    image = _image(llava_dir, seed=2)
    first = _run(engine, "a", image)
    hash_only = _by_hash(image)
    engine.add_request(EngineRequest("b", tuple(PROMPT), GREEDY, images=(hash_only,)))
    engine.runner.encoder_cache.put("0" * 64, torch.zeros(TOKENS_PER_IMAGE, 64), ())  # evicts the image
    result = GenerateResult("b")
    while engine.has_unfinished():
        for out in engine.step():
            collect(result, out)
    assert result.token_ids[0] == first
    # the forward put the rows it used back (most recently used); evicted again, they are gone
    engine.runner.encoder_cache.put("1" * 64, torch.zeros(TOKENS_PER_IMAGE, 64), ())
    with pytest.raises(ImageNotCachedError) as refused:
        engine.add_request(EngineRequest("c", tuple(PROMPT), GREEDY, images=(hash_only,)))
    assert refused.value.field == "images[0].hash"


def test_an_image_sent_whole_is_held_even_when_its_kv_is_cached(llava_dir: Path) -> None:
    """An image sent whole whose KV comes from the prefix cache (its embeddings evicted) is
    encoded again all the same: the sender now takes the worker to hold it, and a hash-only
    request must not be refused turn after turn."""
    engine = Engine(
        WorkerConfig(model=str(llava_dir), device="cpu", kv_cache_memory="4MiB", encoder_cache_size=1)
    )
    cache = engine.runner.encoder_cache
    image = _image(llava_dir, seed=6)
    first = _run(engine, "a", image)
    cache.put("0" * 64, torch.zeros(TOKENS_PER_IMAGE, 64), ())  # its embeddings evicted
    (again,) = engine.run([EngineRequest("b", tuple(PROMPT), GREEDY, images=(image,))])
    assert again.usage is not None and again.usage.cached_prompt_tokens >= image.end  # KV reused
    assert again.token_ids[0] == first and image.hash in cache and cache.misses == 2
    assert _run(engine, "c", _by_hash(image)) == first


def test_hash_only_before_the_image_is_encoded(llava_dir: Path) -> None:
    """A hash-only image admitted next to the request that carries its pixels, before any step:
    it takes those pixels, and the image is encoded once."""
    engine = _engine(llava_dir)
    image = _image(llava_dir, seed=3)
    alone = _run(_engine(llava_dir), "ref", image)
    results = engine.run(
        [
            EngineRequest("a", tuple(PROMPT), GREEDY, images=(image,)),
            EngineRequest("b", tuple(PROMPT), GREEDY, images=(_by_hash(image),)),
        ]
    )
    assert [r.token_ids[0] for r in results] == [alone, alone]
    cache = engine.runner.encoder_cache
    assert (cache.misses, cache.by_hash) == (1, 1)


def test_unknown_or_inconsistent_hashes_are_refused(llava_dir: Path) -> None:
    engine = _engine(llava_dir)
    image = _image(llava_dir, seed=4)
    with pytest.raises(ImageNotCachedError) as unknown:
        engine.add_request(EngineRequest("a", tuple(PROMPT), GREEDY, images=(_by_hash(image),)))
    assert unknown.value.field == "images[0].hash"
    assert engine.runner.encoder_cache.hash_misses == 1
    first = _run(engine, "b", image)  # the worker goes on serving; now it holds the image
    wrong_grid = replace(_by_hash(image), grid_thw=(1, 3, 3))  # the hash is of a grid-less image
    with pytest.raises(InvalidRequestError) as grid:
        engine.add_request(EngineRequest("c", tuple(PROMPT), GREEDY, images=(wrong_grid,)))
    assert grid.value.field == "images[0].grid_thw"
    short = replace(_by_hash(image), length=TOKENS_PER_IMAGE - 1)
    with pytest.raises(InvalidRequestError) as length:
        engine.add_request(EngineRequest("d", tuple(PROMPT), GREEDY, images=(short,)))
    assert length.value.field == "images[0].length"
    bad = common_pb2.ImageInput(hash="not-a-sha256", offset=4, length=TOKENS_PER_IMAGE)
    with pytest.raises(InvalidRequestError) as malformed:
        images_from_pb([bad])
    assert malformed.value.field == "images[0].hash"
    assert _run(engine, "e", _by_hash(image)) == first


def test_encode_worker_rows_by_hash(llava_dir: Path) -> None:
    """Rows an encode worker computed, sent once, can be named by their hash later; the encode
    worker itself takes pixels only."""
    encoder = VisionEncoder(WorkerConfig(model=str(llava_dir), device="cpu", role="encode"))
    image = _image(llava_dir, seed=5)
    (rows,) = images_from_pb([image_to_pb(encoder.encode((image,))[0])])  # the wire
    engine = _engine(llava_dir)
    first = _run(engine, "a", rows)
    assert _run(engine, "b", _by_hash(rows)) == first
    assert engine.runner.encoder_cache.misses == 0  # the worker never ran its encoder
    with pytest.raises(InvalidRequestError) as refused:
        encoder.encode((_by_hash(image),))
    assert refused.value.field == "images[0].pixel_values"


def test_the_gateway_mirror_is_an_lru_of_the_workers_size() -> None:
    sent = SentImages()
    sent.add("a", "a")
    assert sent.lookup("a") is None  # capacity 0 (a text model, an older worker): pixels always
    sent.resize(2)
    sent.add("a", "a")
    sent.add("b", "rows-of-b")  # an encode worker's rows: the worker knows them by their hash
    assert sent.lookup("a") == "a"  # touched: b is now the least recently used
    sent.add("c", "c")
    assert (sent.lookup("b"), sent.lookup("a"), len(sent)) == (None, "a", 2)
    sent.resize(1)
    assert (sent.lookup("c"), sent.lookup("a")) == (None, "a")
    sent.clear()
    assert sent.lookup("a") is None


# ---- through the real stack -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("hash-resend")
    worker_args = ["--encoder-cache-size", "2", "--no-enable-prefix-caching"]
    s = Stack(run_dir, llava_dir, worker_args=worker_args)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def worker(stack: Stack) -> Iterator[worker_pb2_grpc.WorkerStub]:
    with grpc.insecure_channel(stack.worker_addresses[0]) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def _info(worker: worker_pb2_grpc.WorkerStub) -> worker_pb2.WorkerInfo:
    return worker.Info(worker_pb2.InfoRequest(), timeout=10)


def _answer(reply: Any) -> tuple[str | None, int, int]:
    return reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.completion_tokens


@pytest.mark.e2e
def test_second_turn_sends_no_pixels(client: openai.OpenAI, worker: worker_pb2_grpc.WorkerStub) -> None:
    assert _info(worker).encoder_cache_size == 2
    parts = [{"type": "text", "text": "Look at this: "}, image_part(png(64, 48, seed=21))]
    first = chat(client, parts)
    before = _info(worker)
    again = chat(client, parts)  # the same request: computed again (no prefix cache) by hash
    after = _info(worker)
    assert _answer(again) == _answer(first)
    assert after.image_bytes_received == before.image_bytes_received  # no pixels came
    assert after.num_images_by_hash == before.num_images_by_hash + 1
    assert after.num_images_encoded == before.num_images_encoded  # nor was it encoded again
    # a later turn of the conversation: the image is in its history
    turn = client.chat.completions.create(
        model="",
        messages=[
            {"role": "user", "content": parts},  # type: ignore[misc,list-item]
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And what else?"},
        ],
        max_tokens=8,
        temperature=0.0,
    )
    assert turn.choices[0].message.content is not None
    last = _info(worker)
    assert last.image_bytes_received == before.image_bytes_received
    assert last.num_images_by_hash == before.num_images_by_hash + 2


def _pixels_request(stack: Stack, rid: str, seed: int) -> worker_pb2.GenerateRequest:
    """A Generate straight to the worker with one image's pixels (behind the gateway's back)."""
    pv = ClipPreprocessor.from_model_dir(str(stack.model))(decode_image(png(30 + seed, 50, seed=seed)))
    image = ImageInput(pv.hash, 1, TOKENS_PER_IMAGE, torch.from_numpy(pv.array))
    return worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=[1, *[IMAGE_TOKEN] * TOKENS_PER_IMAGE, 30, 31],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1),
        images=[image_to_pb(image)],
    )


@pytest.mark.e2e
def test_an_evicted_image_is_resent_with_its_pixels(
    stack: Stack, client: openai.OpenAI, worker: worker_pb2_grpc.WorkerStub
) -> None:
    parts = [
        {"type": "text", "text": "What about "},
        image_part(png(50, 70, seed=22)),
        {"type": "text", "text": "?"},
    ]
    first = chat(client, parts)
    for k in range(2):  # two other images evict it from the worker's cache of two
        list(worker.Generate(_pixels_request(stack, f"evict-{k}", seed=40 + k), timeout=60))
    before = _info(worker)
    resent = chat(client, parts)  # by hash, refused, then with the pixels: the client sees nothing
    after = _info(worker)
    assert _answer(resent) == _answer(first)
    assert after.num_image_hash_misses == before.num_image_hash_misses + 1
    assert after.image_bytes_received == before.image_bytes_received + 3 * 42 * 42 * 4
    assert after.num_images_encoded == before.num_images_encoded + 1
    assert _answer(chat(client, parts)) == _answer(first)  # by hash again
    assert _info(worker).num_images_by_hash == after.num_images_by_hash + 1


@pytest.mark.e2e
def test_unknown_hash_over_grpc(client: openai.OpenAI, worker: worker_pb2_grpc.WorkerStub) -> None:
    request = _pixels_request_hash_only()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(chat, client, [{"type": "text", "text": "Just text, meanwhile."}])
        with pytest.raises(grpc.RpcError) as refused:
            list(worker.Generate(request, timeout=60))
        assert other.result().choices[0].finish_reason in ("stop", "length")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "images[0].hash" in (refused.value.details() or "")  # type: ignore[attr-defined]


def _pixels_request_hash_only() -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id="unknown-hash",
        prompt_token_ids=[1, *[IMAGE_TOKEN] * TOKENS_PER_IMAGE, 30, 31],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4),
        images=[common_pb2.ImageInput(hash="ab" * 32, offset=1, length=TOKENS_PER_IMAGE)],
    )


@pytest.mark.e2e
def test_a_restarted_worker_gets_the_pixels_again(stack: Stack, client: openai.OpenAI) -> None:
    """(Last in the module: it restarts the worker.) Whether the gateway saw the worker go (its
    mirror emptied) or not (a hash-only request refused, then resent), the restarted worker gets
    the image's pixels once and answers as before."""
    parts = [{"type": "text", "text": "Once more: "}, image_part(png(40, 60, seed=23))]
    first = chat(client, parts)
    stack.kill("worker-0")
    address = stack.worker_addresses[0]
    stack._spawn(
        "worker-0",
        ["worker", "--model", str(stack.model), "--address", address, "--device", "cpu", *stack.worker_args],
    )
    stack.wait_healthy(stack.port, timeout_s=120, all_workers=True)
    assert _answer(chat(client, parts)) == _answer(first)
    with grpc.insecure_channel(address) as channel:
        info = _info(worker_pb2_grpc.WorkerStub(channel))
    assert (info.image_bytes_received, info.num_images_encoded, info.num_images_by_hash) == (
        3 * 42 * 42 * 4,
        1,
        0,
    )
    assert _answer(chat(client, parts)) == _answer(first)  # and by hash from then on
