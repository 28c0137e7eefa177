"""Tensor-parallel test fixtures: tiny random HF models whose heads split 2 and 4 ways."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.parallel import forkserver
from tests.parallel.forkserver import start_script
from tests.worker.worker_testlib import TINY, RefModel, _tiny_gpt_oss, load_ref

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _llama(layers: int = 2, **over: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    # 4 query heads: T = 2 and T = 4 both divide them
    return LlamaForCausalLM(
        LlamaConfig(**{**TINY, **over}, num_hidden_layers=layers, tie_word_embeddings=False)
    )


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TINY, num_hidden_layers=2, tie_word_embeddings=True))


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**TINY, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False))


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **TINY,
        num_hidden_layers=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(cfg)


BUILDERS: dict[str, Callable[[], Any]] = {
    # GQA: 2 KV heads (T = 2: one each; T = 4: each replicated on two ranks); a vocabulary that
    # does not split evenly (the last rank's rows are padding)
    "llama_gqa": lambda: _llama(vocab_size=321),
    "llama_mha": lambda: _llama(num_key_value_heads=4),  # 4 KV heads: two per rank with T = 2
    "llama_three_layers": lambda: _llama(layers=3),  # P = 2: stages of 2 and 1 layers
    "qwen2": _qwen2,  # qkv bias, tied embeddings
    "qwen3": _qwen3,  # q/k norms
    "qwen3_moe": _qwen3_moe,  # experts split on their intermediate dimension
    # sinks split with the heads, experts' interleaved gate/up sliced per rank, the down bias once
    "gpt_oss": _tiny_gpt_oss,
}


@pytest.fixture(scope="session")
def tp_refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RefModel]:
    torch.manual_seed(0)
    refs = {}
    for name, build in BUILDERS.items():
        path = tmp_path_factory.mktemp(f"tp-{name}")
        # a sharded checkpoint: each rank reads slices across several files
        build().save_pretrained(str(path), max_shard_size="100KB")
        refs[name] = load_ref(path)
    return refs


@pytest.fixture(scope="session", autouse=True)
def _fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The fork server of this pytest process (tests/parallel/forkserver.py): started by the first
    run that can use it, stopped with the session."""
    forkserver.SHARED.log_dir = tmp_path_factory.mktemp("forkserver")
    yield
    forkserver.SHARED.stop()


class GroupRun:
    """tests/parallel/tp_generate.py (one worker group's engine over `spec`'s prompts) running in
    the background while the test computes its references; `result()` waits for its JSON."""

    def __init__(self, tmp_path: Path, spec: dict[str, Any], *worker_args: str, timeout_s: float = 240):
        prompts, self.out, self.log = tmp_path / "prompts.json", tmp_path / "out.json", tmp_path / "group.log"
        prompts.write_text(json.dumps(spec))
        self.log.write_bytes(b"")
        self.proc = start_script(
            "tp_generate.py", [str(self.out), str(prompts), "--", *worker_args], self.log
        )
        self.timeout_s = timeout_s

    def result(self) -> dict[str, Any]:
        try:
            self.proc.wait(self.timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, self.log.read_text(errors="replace")[-4000:]
        return dict(json.loads(self.out.read_text()))


def run_group(
    tmp_path: Path, spec: dict[str, Any], *worker_args: str, timeout_s: float = 240
) -> dict[str, Any]:
    """tests/parallel/tp_generate.py: one worker group's engine over `spec`'s prompts."""
    return GroupRun(tmp_path, spec, *worker_args, timeout_s=timeout_s).result()
