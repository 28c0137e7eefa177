"""PEFT adapter checks at load (services/worker/lora/adapter.py), on hand-written adapter files:
each unsupported or mismatched adapter is refused with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.worker.lora.adapter import LoRAAdapterError, ModelShapes, ProjectionShape, load_adapter

HIDDEN, Q, KV, INTER = 64, 64, 32, 128
DENSE = ModelShapes(
    num_layers=2,
    projections={
        "qkv_proj": ProjectionShape(HIDDEN, (Q, KV, KV)),
        "o_proj": ProjectionShape(Q, (HIDDEN,)),
        "gate_up_proj": ProjectionShape(HIDDEN, (INTER, INTER)),
        "down_proj": ProjectionShape(INTER, (HIDDEN,)),
    },
    hidden_size=HIDDEN,
)
MOE = ModelShapes(2, {k: v for k, v in DENSE.projections.items() if k in ("qkv_proj", "o_proj")}, HIDDEN)


def _write(
    path: Path, config: dict[str, Any], modules: dict[str, tuple[int, int]], layers: int = 2, rank: int = 4
) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8, **config})
    )
    tensors = {}
    for layer in range(layers):
        for module, (n_in, n_out) in modules.items():
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in)
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_good_adapter_loads_with_its_scaling(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ok", {"use_rslora": True}, {"q_proj": (HIDDEN, Q), "down_proj": (INTER, HIDDEN)}
    )
    adapter = load_adapter("ok", str(path), DENSE, max_rank=16)
    assert adapter.rank == 4 and adapter.scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert adapter.target_modules == ["down_proj", "q_proj"] and len(adapter.digest) == 32
    assert load_adapter("ok2", str(path), DENSE, 16).root_hash == adapter.root_hash  # by content, not name


@pytest.mark.parametrize(
    ("config", "modules", "shapes", "layers", "message"),
    [
        ({}, {"gate_proj": (HIDDEN, INTER)}, MOE, 2, "the model lacks it"),
        ({"use_dora": True}, {"q_proj": (HIDDEN, Q)}, DENSE, 2, "DoRA is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, {"q_proj": (HIDDEN, Q)}, DENSE, 2, "rank_pattern"),
        ({"bias": "all"}, {"q_proj": (HIDDEN, Q)}, DENSE, 2, "trained biases"),
        ({"lora_bias": True}, {"q_proj": (HIDDEN, Q)}, DENSE, 2, "a bias on lora_B"),
        (
            {"target_parameters": ["experts.gate_up_proj"]},
            {"q_proj": (HIDDEN, Q)},
            DENSE,
            2,
            "target_parameters",
        ),
        ({"peft_type": "IA3"}, {"q_proj": (HIDDEN, Q)}, DENSE, 2, "peft_type 'IA3'"),
        ({}, {"q_proj": (HIDDEN, Q)}, DENSE, 3, "is for layer 2, the model has 2"),
        ({}, {"k_proj": (HIDDEN, Q)}, DENSE, 2, "different base model"),
        ({}, {"c_attn": (HIDDEN, Q)}, DENSE, 2, "target module 'c_attn'"),
    ],
)
def test_bad_adapters_are_refused(
    tmp_path: Path,
    config: dict[str, Any],
    modules: dict[str, tuple[int, int]],
    shapes: ModelShapes,
    layers: int,
    message: str,
) -> None:
    path = _write(tmp_path / "bad", config, modules, layers)
    with pytest.raises(LoRAAdapterError, match=message.replace("(", r"\(")):
        load_adapter("bad", str(path), shapes, max_rank=16)


def test_half_a_pair_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "half", {}, {"q_proj": (HIDDEN, Q)})
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, HIDDEN)},
        str(path / "adapter_model.safetensors"),
    )
    with pytest.raises(LoRAAdapterError, match="lora_A or lora_B but not both"):
        load_adapter("half", str(path), DENSE, max_rank=16)


def test_a_rank_reads_only_its_shard(tmp_path: Path) -> None:
    """Tensor-parallel rank 1 of 2, pipeline stage holding layer 1: column-parallel B by output rows
    (per fused part), row-parallel A by input columns, the other tensors whole; layer 0 not read,
    but its shapes still checked against the whole model."""
    modules = {"q_proj": (HIDDEN, Q), "v_proj": (HIDDEN, KV), "up_proj": (HIDDEN, INTER)}
    modules |= {"o_proj": (Q, HIDDEN), "down_proj": (INTER, HIDDEN)}
    path = _write(tmp_path / "ok", {}, modules)
    whole = load_adapter("whole", str(path), DENSE, max_rank=16)
    q, kv, inter = Q // 2, KV // 2, INTER // 2
    rank1 = ModelShapes(
        num_layers=2,
        projections={
            "qkv_proj": ProjectionShape(HIDDEN, (Q, KV, KV), part_rows=((q, q), (kv, kv), (kv, kv))),
            "o_proj": ProjectionShape(Q, (HIDDEN,), in_cols=(q, q)),
            "gate_up_proj": ProjectionShape(
                HIDDEN, (INTER, INTER), part_rows=((inter, inter), (inter, inter))
            ),
            "down_proj": ProjectionShape(INTER, (HIDDEN,), in_cols=(inter, inter)),
        },
        hidden_size=HIDDEN,
        layers=(1, 2),
    )
    shard = load_adapter("shard", str(path), rank1, max_rank=16, lora_id=whole.lora_id)
    assert shard.lora_id == whole.lora_id and shard.digest == whole.digest
    assert sorted(shard.weights) == [(1, m) for m in sorted(modules)]
    for module, (a_cols, b_rows) in {
        "q_proj": (slice(None), slice(q, 2 * q)),
        "v_proj": (slice(None), slice(kv, 2 * kv)),
        "up_proj": (slice(None), slice(inter, 2 * inter)),
        "o_proj": (slice(q, 2 * q), slice(None)),
        "down_proj": (slice(inter, 2 * inter), slice(None)),
    }.items():
        mine, full = shard.weights[(1, module)], whole.weights[(1, module)]
        assert torch.equal(mine.a, full.a[:, a_cols]), module
        assert torch.equal(mine.b, full.b[b_rows]), module
    # a layer the stage does not hold is still checked
    bad = _write(tmp_path / "bad", {}, {"k_proj": (HIDDEN, Q)})
    with pytest.raises(LoRAAdapterError, match="layer 0 k_proj"):
        load_adapter("bad", str(bad), rank1, max_rank=16)
