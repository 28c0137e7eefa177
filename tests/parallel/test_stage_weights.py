"""Each pipeline stage builds and reads only what it runs: stage 0 its layers plus the embedding,
the final norm and the LM head; a later stage its layers alone (models/llama.py OnFirstStage,
loader.py `_this_stage`). Every rank of a T x P group is built here in this process, from a real
sharded checkpoint, with the group's state set to that rank's place (building and loading run no
collective), and the tensors it read are recorded."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import REFERENCE_OPS
from services.worker import loader, parallel
from services.worker.checkpoint import CheckpointTensor, iter_checkpoint
from services.worker.loader import build_model
from services.worker.model_config import load_model_config
from services.worker.models.llama import LlamaForCausalLM, OnFirstStage
from tests.parallel.conftest import BUILDERS

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FIRST_STAGE = ("model.embed_tokens.", "model.norm.", "lm_head.")


class _Recorded(CheckpointTensor):
    """A checkpoint tensor that notes its name when any of it is read."""

    def __init__(self, name: str, tensor: CheckpointTensor, reads: set[str]) -> None:
        super().__init__(tensor._source, tensor.shape, tensor._whole)
        self.name, self.reads = name, reads

    def read(self, dim: int, start: int, size: int) -> torch.Tensor:
        self.reads.add(self.name)
        return super().read(dim, start, size)


def _build_rank(
    path: Path, state: parallel.ParallelState, monkeypatch: pytest.MonkeyPatch
) -> tuple[LlamaForCausalLM, set[str]]:
    reads: set[str] = set()

    def recording(model_dir: str) -> Iterator[tuple[str, str, CheckpointTensor]]:
        for file_name, name, tensor in iter_checkpoint(model_dir):
            yield file_name, name, _Recorded(name, tensor, reads)

    monkeypatch.setattr(parallel, "_STATE", state)
    monkeypatch.setattr(loader, "iter_checkpoint", recording)
    try:
        cfg = load_model_config(str(path))
        model = build_model(cfg, REFERENCE_OPS, torch.device("cpu"), torch.float32, "auto")
    finally:
        monkeypatch.undo()
    return model, reads


def _tied(model: LlamaForCausalLM) -> bool:
    # (a quantized LM head has no `weight`: its own packed tensors)
    return getattr(model.lm_head, "weight", None) is model.model.embed_tokens.weight


def _bytes(params: Iterator[tuple[str, torch.nn.Parameter]]) -> int:
    return sum(p.numel() * p.element_size() for _, p in params)


def _check_stages(path: Path, tp: int, pp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, whole_reads = _build_rank(path, parallel.ParallelState(), monkeypatch)
    tied = _tied(whole)
    layer_bytes = [_bytes(layer.named_parameters()) for layer in whole.model.layers]
    for stage in range(pp):
        for t in range(tp):
            model, reads = _build_rank(path, parallel.ParallelState(tp, t, pp, stage), monkeypatch)
            layout = model.layout
            names = [n for n, _ in model.named_parameters()]
            held = {int(m[1]) for n in names if (m := _LAYER.match(n))}
            assert held == set(range(layout.layer_start, layout.layer_end))
            ends = [n for n in names if n.startswith(_FIRST_STAGE)]
            read_layers = {int(m[1]) for n in reads if (m := _LAYER.match(n))}
            assert read_layers == held, f"stage {stage} read layers {sorted(read_layers)}"
            read_ends = {n for n in reads if n.startswith(_FIRST_STAGE)}
            if stage == 0:
                assert {n.split(".")[-2] for n in ends} >= {"embed_tokens", "norm"}
                assert _tied(model) == tied
                assert read_ends == {n for n in whole_reads if n.startswith(_FIRST_STAGE)}
                continue
            # a later stage: no embedding, final norm or LM head, built or read
            assert ends == [], f"stage {stage} rank {t} holds {ends}"
            assert read_ends == set(), f"stage {stage} rank {t} read {sorted(read_ends)}"
            for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
                assert isinstance(module, OnFirstStage)
            # its parameter bytes: its layers' shards, nothing else
            ours = _bytes(model.named_parameters())
            if tp == 1:
                assert ours == sum(layer_bytes[layout.layer_start : layout.layer_end])
            else:
                assert ours == _bytes(model.model.layers.named_parameters())


@pytest.mark.parametrize(
    ("name", "tp", "pp"),
    [
        ("llama_three_layers", 1, 2),  # untied; stages of 2 and 1 layers
        ("llama_three_layers", 2, 2),
        ("qwen2", 1, 2),  # tied embeddings
        ("qwen2", 2, 2),
        ("gpt_oss", 1, 2),  # its experts converted as they are read (remap_checkpoint)
    ],
)
def test_each_stage_holds_and_reads_only_its_modules(
    name: str, tp: int, pp: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    BUILDERS[name]().save_pretrained(str(tmp_path), max_shard_size="100KB")  # several files
    _check_stages(tmp_path, tp, pp, monkeypatch)


def test_a_quantized_lm_head_is_read_by_stage_0_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose LM head is quantized (compressed-tensors int8): its packed tensors are
    stage 0's alone."""
    from tests.worker.test_quantized_lm_head import write_quantized_head_checkpoint

    torch.manual_seed(0)
    hf: Any = BUILDERS["llama_three_layers"]()
    write_quantized_head_checkpoint(hf, tmp_path, "ct-int8")
    _check_stages(tmp_path, 2, 2, monkeypatch)


def test_per_stage_bytes_add_up_to_the_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With P = 2 (T = 1) the stages' parameters together are the whole model's, once: the
    embedding and LM head are not held twice."""
    torch.manual_seed(0)
    BUILDERS["llama_three_layers"]().save_pretrained(str(tmp_path))
    whole, _ = _build_rank(tmp_path, parallel.ParallelState(), monkeypatch)
    stages = [_build_rank(tmp_path, parallel.ParallelState(1, 0, 2, s), monkeypatch)[0] for s in range(2)]
    assert sum(_bytes(m.named_parameters()) for m in stages) == _bytes(whole.named_parameters())
