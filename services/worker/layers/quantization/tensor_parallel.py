"""Quantized weights split over tensor-parallel ranks: the start-time check that every rank holds
whole quantization groups (and FP8 blocks) of its shards, and whole packed words / blocks of a
quantized LM head's vocabulary rows."""

from __future__ import annotations

from typing import Any

from services.worker.layers.quantization import checkpoint_quantization
from services.worker.layers.quantization.checkpoint_formats import quantizes_lm_head
from services.worker.model_config import ModelConfig, ModelConfigError


def _checkpoint_group_size(qcfg: dict[str, Any]) -> tuple[str, int]:
    """(scheme, group size along K; 0 for none) of a pre-quantized checkpoint's config."""
    method = str(qcfg.get("quant_method", ""))
    if method in ("gptq", "awq"):
        return method, max(0, int(str(qcfg.get("group_size", qcfg.get("q_group_size", 128)))))
    if method == "fp8" and isinstance(qcfg.get("weight_block_size"), list):
        return "block fp8", int(qcfg["weight_block_size"][1])
    if method == "compressed-tensors" and isinstance(qcfg.get("config_groups"), dict):
        for group in qcfg["config_groups"].values():
            weights = group.get("weights") or {}
            if weights.get("strategy") == "group":
                return method, int(weights.get("group_size") or 0)
    return method, 0


def check_quantization(cfg: ModelConfig, tp_size: int, quantization: str, group_size: int) -> None:
    """A one-line error when a quantization group along K would straddle two ranks' shards of a
    row-parallel projection (o_proj, down_proj hold K / T input columns each): each rank
    quantizes (or reads) whole groups only."""
    if tp_size == 1:
        return
    if quantization == "none":
        qcfg = checkpoint_quantization(cfg.path)
        if qcfg is None:
            return
        scheme, group = _checkpoint_group_size(qcfg)
        what = f"the checkpoint's {scheme} group size {group}"
        if scheme == "gptq" and qcfg.get("desc_act"):
            raise ModelConfigError(
                f"{cfg.path}: a GPTQ act-order (desc_act) checkpoint cannot be split over --tensor-parallel-size "
                f"{tp_size} ranks: a rank's input columns of o_proj / down_proj belong to groups anywhere in the row"
            )
        if scheme == "block fp8":  # the column-parallel slices must hold whole blocks of rows too
            rows = int(qcfg["weight_block_size"][0])
            kv = cfg.num_kv_heads // tp_size if cfg.num_kv_heads >= tp_size else 1
            for layer, n in (
                ("q_proj", cfg.num_heads // tp_size * cfg.head_dim),
                ("k_proj / v_proj", kv * cfg.head_dim),
                ("gate_proj / up_proj", cfg.intermediate_size // tp_size),
            ):
                if n % rows:
                    raise ModelConfigError(
                        f"the checkpoint's {rows}-row FP8 blocks do not divide the {n} rows of {layer} that each "
                        f"of --tensor-parallel-size {tp_size} ranks holds: a block would straddle two ranks"
                    )
        _check_lm_head(cfg, tp_size, qcfg)
    else:
        group = group_size or (128 if quantization == "int4" else 0)
        what = f"--quantization {quantization} group size {group}"
    if not group:
        return
    for layer, k in (("o_proj", cfg.num_heads * cfg.head_dim), ("down_proj", cfg.intermediate_size)):
        if (k // tp_size) % group:
            raise ModelConfigError(
                f"{what} does not divide the {k // tp_size} input columns of {layer} that each of "
                f"--tensor-parallel-size {tp_size} ranks holds ({k} / {tp_size}): a group would straddle "
                "two ranks; choose a group size that divides it"
            )


def _lm_head_row_unit(qcfg: dict[str, Any]) -> tuple[int, str]:
    """(rows, what) a quantized LM head's tensors are packed or blocked in along the vocabulary."""
    method = str(qcfg.get("quant_method", ""))
    if method == "gptq":
        return 32 // int(qcfg.get("bits", 4)), "GPTQ's qzeros pack them in int32 words"
    if method == "awq":
        return 8, "AWQ packs them in int32 words"
    if method == "fp8" and isinstance(qcfg.get("weight_block_size"), list):
        return int(qcfg["weight_block_size"][0]), "FP8 blocks"
    return 1, "rows"


def _check_lm_head(cfg: ModelConfig, tp_size: int, qcfg: dict[str, Any]) -> None:
    """A checkpoint's quantized LM head is split by vocabulary rows (ceil(V / T) a rank, the last
    rank the rest): each rank's slice must hold whole packed words / blocks of rows."""
    if not quantizes_lm_head(qcfg):
        return
    unit, what = _lm_head_row_unit(qcfg)
    per_rank = -(-cfg.vocab_size // tp_size)
    if per_rank % unit or cfg.vocab_size % unit:
        raise ModelConfigError(
            f"the checkpoint's quantized LM head comes in units of {unit} vocabulary rows ({what}), "
            f"which do not divide the {per_rank} rows that each of --tensor-parallel-size {tp_size} "
            f"ranks holds (vocabulary {cfg.vocab_size}): a unit would straddle two ranks"
        )
