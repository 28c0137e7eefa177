"""Gemma 2, Gemma 3 (text), Phi-3 and Mistral with a sliding window: greedy output equals
transformers' generate with many requests in flight, chunked prefill, prefix hits and preemption,
on sequences much longer than the window (8 positions); logprobs within 1e-4; the config fields
these families read (layer patterns, local ropes, LongRoPE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_testlib import (
    RefModel,
    check_greedy_matches_transformers,
    check_logprobs_match_transformers,
    check_prefix_hits_and_preemption,
)

from services.worker.model_config import ModelConfigError, load_model_config

FAMILIES = ["mistral_sw", "gemma2", "gemma3", "phi3"]
LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40]


def _context(model: str) -> dict[str, int]:
    """Phi-3's tiny config has a LongRoPE switch at 64 positions: served within it, the short
    factors apply (transformers' choice for sequences of these lengths)."""
    return {"max_model_len": 64} if model == "phi3" else {}


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_matches_transformers(ref_models: dict[str, RefModel], model: str, budget: int) -> None:
    engine = check_greedy_matches_transformers(ref_models[model], LENGTHS, budget, **_context(model))
    assert engine.max_model_len > 8  # the window does not cap the context


@pytest.mark.parametrize("model", FAMILIES)
def test_prefix_hits_and_preemption(ref_models: dict[str, RefModel], model: str) -> None:
    check_prefix_hits_and_preemption(ref_models[model])


@pytest.mark.parametrize("model", FAMILIES)
def test_logprobs_match_transformers(ref_models: dict[str, RefModel], model: str) -> None:
    check_logprobs_match_transformers(ref_models[model], 21, max_tokens=8, seed=5, **_context(model))


def test_phi3_long_context_uses_the_long_factors(ref_models: dict[str, RefModel]) -> None:
    """Served past original_max_position_embeddings (64), every position rotates with LongRoPE's
    long factors, as transformers does for a prompt longer than that."""
    check_logprobs_match_transformers(ref_models["phi3"], 70, max_tokens=12, seed=6, max_model_len=128)


def _write_config(tmp_path: Path, cfg: dict) -> str:  # type: ignore[type-arg]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


GEMMA3_4X = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
}


def test_gemma3_config_of_transformers_4(tmp_path: Path) -> None:
    """A Gemma 3 config.json as the model repos ship it (no layer_types): five local layers, then
    a global one; the local layers' rope base; q/k norms; the window does not cap the context."""
    cfg = load_model_config(_write_config(tmp_path, GEMMA3_4X))
    assert cfg.qk_norm and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert [cfg.layer_window(i) for i in range(7)] == [512] * 5 + [0] + [512]
    assert cfg.attention_scale == 256**-0.5


def test_longrope_su_config_of_phi3(tmp_path: Path) -> None:
    """Phi-3-mini-128k's spelling: rope_scaling type "su", original_max_position_embeddings at the
    top level; the attention factor comes from the ratio of the two lengths."""
    factors = [1.0] * 48
    cfg = load_model_config(
        _write_config(
            tmp_path,
            {
                "architectures": ["Phi3ForCausalLM"],
                "model_type": "phi3",
                "vocab_size": 32064,
                "hidden_size": 3072,
                "intermediate_size": 8192,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {"type": "su", "short_factor": factors, "long_factor": factors},
                "sliding_window": 262144,
            },
        )
    )
    assert cfg.rope_scaling is not None
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.rope_scaling["factor"] == 32.0


def test_partial_rotary_is_a_clear_error(tmp_path: Path) -> None:
    cfg = {**GEMMA3_4X, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    cfg["partial_rotary_factor"] = 0.75
    with pytest.raises(ModelConfigError, match="partial_rotary_factor"):
        load_model_config(_write_config(tmp_path, cfg))


@pytest.mark.parametrize("model", FAMILIES)
def test_every_family_has_the_engine_step_hooks(ref_models: dict[str, RefModel], model: str) -> None:
    """The attributes the engine hooks into a forward (EAGLE-3 streams, pipeline trace, LoRA
    mapping) exist on every family's model, also those that build themselves without
    LlamaModel.__init__: Gemma 2/3 lacked them, and the first CUDA-graph capture of a Gemma 3 on
    the GPU failed on `aux_layers`."""
    import types

    import torch

    from kernels import get_ops
    from services.worker.loader import build_model
    from services.worker.models.llama import LlamaModel

    probe = types.SimpleNamespace()
    LlamaModel.init_step_hooks(probe)  # type: ignore[arg-type]
    cfg = load_model_config(str(ref_models[model].path))
    built = build_model(
        cfg, get_ops("reference", torch.device("cpu")), torch.device("cpu"), torch.float32, "dummy"
    )
    missing = [name for name in vars(probe) if not hasattr(built.model, name)]
    assert not missing, f"{model}: {missing}"
