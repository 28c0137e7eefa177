"""Pooling mode (`--task embed`): the worker's embeddings equal transformers' (AutoModel's last
hidden state at the last token, L2-normalised) within 1e-4, for mixed batches of prompts of
different lengths with chunked prefill, prefix-cache hits and async scheduling; no KV block stays
referenced after a request; a request of the other task is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from embedding_testlib import reference, write_tiny_embedding_model
from worker_testlib import TINY, prompts_of_lengths

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.model_config import ModelConfigError
from services.worker.request import EngineRequest, InvalidRequestError, SamplingParams

LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40, 64]
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_embedding_model(tmp_path_factory.mktemp("tiny-qwen3-embedding"))


def embed_engine(path: Path, **overrides: Any) -> Engine:
    options: dict[str, Any] = {
        "model": str(path),
        "device": "cpu",
        "kv_cache_memory": "4MiB",
        "max_model_len": MAX_MODEL_LEN,
        "task": "embed",
    }
    options.update(overrides)
    return Engine(WorkerConfig(**options))


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_num_batched_tokens": 2048},
        {"max_num_batched_tokens": 16},  # chunked prefill: long prompts over several steps
        {"max_num_batched_tokens": 24, "async_scheduling": "on"},
        {"max_num_batched_tokens": 16, "max_num_seqs": 3},  # few slots: requests queue behind others
    ],
)
def test_embeddings_equal_transformers(embedding_dir: Path, overrides: dict[str, Any]) -> None:
    engine = embed_engine(embedding_dir, **overrides)
    prompts = prompts_of_lengths(LENGTHS, TINY["vocab_size"], seed=7)
    # a shared 32-token prefix: the second batch hits the prefix cache of the first
    shared = [prompts[-1][:32] + p for p in prompts_of_lengths([1, 5, 20], TINY["vocab_size"], seed=8)]
    want = reference(embedding_dir, prompts + shared)
    for batch in (prompts + shared, list(reversed(prompts + shared))):
        got = engine.embed(batch)
        expected = want if batch[0] is prompts[0] else list(reversed(want))
        for prompt, vector, ref in zip(batch, got, expected, strict=True):
            assert len(vector) == TINY["hidden_size"]
            torch.testing.assert_close(
                torch.tensor(vector), ref, atol=1e-4, rtol=0, msg=f"{len(prompt)} tokens"
            )
        assert engine.block_manager.num_used_blocks == 0  # every block freed at once
        assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_hit_tokens > 0  # the prefixes were cached and reused


def test_requests_in_flight_over_steps(embedding_dir: Path) -> None:
    """Requests added while others are mid-prefill end in the order their prompts complete, each
    with its own embedding, and the usage counts its prompt."""
    engine = embed_engine(embedding_dir, max_num_batched_tokens=8)
    prompts = prompts_of_lengths([40, 2, 17, 9], TINY["vocab_size"], seed=3)
    want = reference(embedding_dir, prompts)
    engine.add_request(EngineRequest("long", tuple(prompts[0]), pooling=True))
    outputs = engine.step()  # the long prompt's first chunk
    assert not outputs and engine.block_manager.num_used_blocks > 0
    for i, prompt in enumerate(prompts[1:], start=1):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), pooling=True))
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finished and out.usage is not None and out.embedding is not None
            assert out.usage.completion_tokens == 0
            results[out.request_id] = (out.embedding, out.usage.prompt_tokens)
    for i, rid in enumerate(["long", "r1", "r2", "r3"]):
        vector, prompt_tokens = results[rid]
        assert prompt_tokens == len(prompts[i])
        torch.testing.assert_close(torch.tensor(vector), want[i], atol=1e-4, rtol=0)
    assert engine.block_manager.num_used_blocks == 0


def test_abort_frees_blocks(embedding_dir: Path) -> None:
    engine = embed_engine(embedding_dir, max_num_batched_tokens=8)
    engine.add_request(EngineRequest("a", tuple(range(3, 43)), pooling=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort("a")
    assert out is not None and out.finished and out.embedding is None
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_the_whole_context_and_no_more(embedding_dir: Path) -> None:
    engine = embed_engine(embedding_dir)
    (vector,) = engine.embed([list(range(3, 3 + MAX_MODEL_LEN))])  # nothing is generated after it
    assert len(vector) == TINY["hidden_size"]
    with pytest.raises(InvalidRequestError, match="prompt_token_ids: the input has 65 tokens"):
        engine.add_request(EngineRequest("x", tuple(range(3, 4 + MAX_MODEL_LEN)), pooling=True))
    with pytest.raises(InvalidRequestError, match="prompt_token_ids: token id 320"):
        engine.add_request(EngineRequest("y", (5, 320), pooling=True))


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 saved as the causal LM (model.* names and an LM head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-qwen3-causal")
    Qwen3ForCausalLM(Qwen3Config(**TINY, num_hidden_layers=1, head_dim=32)).save_pretrained(str(path))
    return path


def test_each_task_refuses_the_other(embedding_dir: Path, causal_dir: Path) -> None:
    embed = embed_engine(causal_dir)
    with pytest.raises(InvalidRequestError, match="task: this worker runs --task embed"):
        embed.add_request(EngineRequest("g", (1, 2, 3), SamplingParams(max_tokens=2)))
    generate = embed_engine(causal_dir, task="generate")
    with pytest.raises(InvalidRequestError, match="task: this worker runs --task generate"):
        generate.add_request(EngineRequest("e", (1, 2, 3), pooling=True))
    # a base-model checkpoint has no LM head: it can only embed
    with pytest.raises(ModelConfigError, match=r"missing tensor\(s\) lm_head\.weight"):
        embed_engine(embedding_dir, task="generate")


def test_a_causal_lm_checkpoint_embeds_too(causal_dir: Path) -> None:
    """The same decoder, its LM head loaded and unused."""
    prompts = prompts_of_lengths([5, 21], TINY["vocab_size"], seed=4)
    got = embed_engine(causal_dir).embed(prompts)
    for vector, ref in zip(got, reference(causal_dir, prompts), strict=True):
        torch.testing.assert_close(torch.tensor(vector), ref, atol=1e-4, rtol=0)


def test_embed_workers_are_unified() -> None:
    with pytest.raises(ValueError, match="--task embed with --role prefill"):
        WorkerConfig(model="m", task="embed", role="prefill")
